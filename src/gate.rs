//! The fleet's gate before a switch. In a deploy to several hosts at once, each host's sync step
//! streams and checks its new release, then waits here until every host has: then all switch, or,
//! if a host failed first, none does. So a deploy that fails on one host (a full disk, a lost
//! connection, a hand edit found) leaves every host's files as they were, as Capistrano's "upload
//! everywhere, then symlink" does. What happens after a switch (a container that fails its health
//! check) is each host's own to take back.
//!
//! The hosts take their deploy locks in one order, that of their names, each once those before it
//! hold theirs: two deploys of the same hosts at once then meet at the first host, and one of
//! them goes on (without `--lock-wait`, each could otherwise take some hosts' locks and fail on
//! the others'; with it, each could wait on the other).

use std::collections::{BTreeMap, BTreeSet};

use tokio::sync::watch;

/// One deploy's gates, one per sync step (named by its `to` as written), shared by its hosts.
pub struct Gate {
    hosts: BTreeSet<String>,
    state: watch::Sender<State>,
}

#[derive(Default)]
struct State {
    /// Per sync target: how many hosts are ready to switch it (or have nothing to switch).
    arrived: BTreeMap<String, usize>,
    /// The first host that failed, and where.
    failed: Option<String>,
    /// The hosts that hold their deploy locks.
    locked: BTreeSet<String>,
}

impl Gate {
    /// A gate for the hosts (by name) that run at once.
    pub fn new<'a>(hosts: impl IntoIterator<Item = &'a str>) -> Gate {
        Gate {
            hosts: hosts.into_iter().map(str::to_string).collect(),
            state: watch::Sender::new(State::default()),
        }
    }

    /// Wait until every host whose name sorts before `host` holds its lock. `Err` names the host
    /// that failed first.
    pub async fn lock_turn(&self, host: &str) -> Result<(), String> {
        let before: Vec<&String> = self.hosts.iter().filter(|h| h.as_str() < host).collect();
        self.wait(|s| before.iter().all(|h| s.locked.contains(*h)))
            .await
    }

    /// `host` holds its deploy lock.
    pub fn locked(&self, host: &str) {
        self.state.send_modify(|s| {
            s.locked.insert(host.to_string());
        });
    }

    /// This host has nothing to switch at `target`: the others need not wait for it.
    pub fn arrive(&self, target: &str) {
        self.state
            .send_modify(|s| *s.arrived.entry(target.to_string()).or_default() += 1);
    }

    /// This host is ready to switch `target`: wait for every host. `Err` names the host that
    /// failed before all were ready.
    pub async fn pass(&self, target: &str) -> Result<(), String> {
        self.arrive(target);
        self.wait(|s| s.arrived.get(target).copied().unwrap_or(0) >= self.hosts.len())
            .await
    }

    /// Wait until `all` holds, or a host failed first (`Err` names it).
    async fn wait(&self, all: impl Fn(&State) -> bool) -> Result<(), String> {
        let mut rx = self.state.subscribe();
        let state = rx
            .wait_for(|s| all(s) || s.failed.is_some())
            .await
            .map_err(|_| "the deploy ended".to_string())?;
        match &state.failed {
            _ if all(&state) => Ok(()),
            Some(host) => Err(host.clone()),
            None => Err("the deploy ended".into()),
        }
    }

    /// `host` failed (or ended before some gate): the gates not yet open stay shut.
    pub fn fail(&self, host: &str) {
        self.state.send_modify(|s| {
            s.failed.get_or_insert_with(|| host.to_string());
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn opens_when_all_arrive_and_stays_shut_after_a_failure() {
        let gate = std::sync::Arc::new(Gate::new(["web1", "web2", "web3"]));
        let waiting = {
            let g = gate.clone();
            tokio::spawn(async move { g.pass("/srv/a").await })
        };
        gate.arrive("/srv/a");
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        assert_eq!(gate.pass("/srv/a").await, Ok(()));
        assert_eq!(waiting.await.unwrap(), Ok(()));
        // A host failing after it passed one gate shuts the next.
        gate.fail("web2");
        assert_eq!(gate.pass("/srv/b").await, Err("web2".to_string()));
    }

    #[tokio::test]
    async fn locks_are_taken_in_the_order_of_the_names() {
        let gate = std::sync::Arc::new(Gate::new(["web2", "web1", "web3"]));
        assert_eq!(gate.lock_turn("web1").await, Ok(()));
        let third = {
            let g = gate.clone();
            tokio::spawn(async move { g.lock_turn("web3").await })
        };
        gate.locked("web1");
        tokio::task::yield_now().await;
        assert!(!third.is_finished(), "web2 has not locked yet");
        assert_eq!(gate.lock_turn("web2").await, Ok(()));
        gate.locked("web2");
        assert_eq!(third.await.unwrap(), Ok(()));
        // A host before this one that failed (its lock held by another deploy): no turn.
        let gate = Gate::new(["a", "b"]);
        gate.fail("a");
        assert_eq!(gate.lock_turn("b").await, Err("a".to_string()));
    }
}
