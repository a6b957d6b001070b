//! Fleet: run one piece of work on many hosts at once, bounded by `forks`, each in its own tracing
//! span. A host that fails (to connect or to deploy) never stops the others; the caller gets one
//! outcome per host, in inventory order, to summarise and turn into an exit code.

use std::future::Future;
use std::time::{Duration, Instant};

use futures::stream::{self, StreamExt};
use tracing::Instrument;

use crate::inventory::Host;
use crate::ssh::{Connector, Session};

/// What happened on one host.
#[derive(Debug)]
pub struct Outcome<T> {
    pub host: String,
    pub result: anyhow::Result<T>,
    pub elapsed: Duration,
}

/// Connect to each host (at most `forks` at once) and run `work` on the session.
pub async fn run<T, F, Fut>(
    connector: &Connector,
    hosts: &[Host],
    forks: usize,
    work: F,
) -> Vec<Outcome<T>>
where
    F: Fn(Host, Session) -> Fut,
    Fut: Future<Output = anyhow::Result<T>>,
{
    run_with(connector, hosts, forks, None, work, |_| {}).await
}

/// [`run`], calling `done` with each host's outcome as soon as it has one (while others run);
/// once `stop` turns true (SIGINT/SIGTERM), hosts still connecting (retries, a stalled host) give
/// up, and those not begun do not start.
pub async fn run_with<T, F, Fut, D>(
    connector: &Connector,
    hosts: &[Host],
    forks: usize,
    stop: Option<&tokio::sync::watch::Receiver<bool>>,
    work: F,
    done: D,
) -> Vec<Outcome<T>>
where
    F: Fn(Host, Session) -> Fut,
    Fut: Future<Output = anyhow::Result<T>>,
    D: Fn(&Outcome<T>),
{
    let (work, done) = (&work, &done);
    let mut outcomes: Vec<(usize, Outcome<T>)> = stream::iter(hosts.iter().cloned().enumerate())
        .map(|(i, host)| async move {
            let name = host.name().to_string();
            let span = tracing::info_span!("host", host = %name);
            let start = Instant::now();
            let result = async {
                let connect = connector.connect(&host.target);
                let session = match stop {
                    Some(stop) => tokio::select! {
                        s = connect => s?,
                        _ = crate::deploy::interrupted(stop) => anyhow::bail!(
                            "{}: interrupted (SIGINT/SIGTERM) before it was reached; nothing \
                             changed there",
                            host.name()
                        ),
                    },
                    None => connect.await?,
                };
                tracing::debug!(elapsed = ?start.elapsed(), "connected");
                work(host, session).await
            }
            .instrument(span)
            .await;
            let outcome = Outcome {
                host: name,
                result,
                elapsed: start.elapsed(),
            };
            done(&outcome);
            (i, outcome)
        })
        .buffer_unordered(forks.max(1))
        .collect()
        .await;
    outcomes.sort_by_key(|(i, _)| *i);
    outcomes.into_iter().map(|(_, o)| o).collect()
}
