//! SSH transport: one verified, authenticated connection per host, and remote commands on it.
//!
//! This is the only module that opens connections (`keys` and `known_hosts` use russh's key
//! types). Everything above it sees [`Session`]: run an argv (each argument shell-quoted), a
//! script, or open a process whose stdin is streamed. Channels share one connection and are capped
//! below OpenSSH's `MaxSessions`.

use std::ffi::OsStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use russh::client::{self, Handle};
use russh::keys::agent::client::AgentClient;
use russh::keys::{PrivateKeyWithHashAlg, PublicKey};
use russh::{ChannelMsg, Disconnect};
use tokio::io::AsyncWriteExt;
use tokio::sync::Semaphore;

use crate::keys::Credentials;
use crate::known_hosts::{self, CertVerdict, KnownHosts, Verdict};
use crate::shell;

/// OpenSSH allows 10 sessions per connection by default; stay below.
const MAX_CHANNELS: usize = 8;
const CONNECT_ATTEMPTS: u32 = 3;

/// How [`Session::run_watched`] runs a command on the host (`sh -c WATCHED ferry-run ARGV...`). It
/// exports the `NAME=value` lines on stdin up to an empty line, then runs its arguments with stdin
/// from /dev/null. ferry keeps stdin open until the command ends: should it close first (a timeout,
/// Ctrl-C, ferry killed, the connection lost), the command and everything it started (this SSH
/// session's process group) get SIGTERM, and SIGKILL 5 s later, as a terminal's hangup would do.
/// (The command runs in the foreground: a background job would start with SIGINT and SIGQUIT
/// ignored, and so would all it starts. The process group is the session's own: OpenSSH's sshd
/// starts each session with `setsid`.)
const WATCHED: &str = r#"while IFS= read -r l && [ -n "$l" ]; do export "$l" || exit 125; done
exec 3<&0
{ while read -r _ <&3; do :; done; trap '' TERM; kill -TERM 0; sleep 5; kill -KILL 0; } < /dev/null &
w=$!
"$@" < /dev/null 3<&-
st=$?
kill "$w" 2>/dev/null
exit "$st""#;

/// Where to connect: a resolved host with an optional bastion in front.
#[derive(Debug, Clone)]
pub struct Target {
    /// Display name (the host's name in the playbook).
    pub name: String,
    pub user: String,
    pub host: String,
    pub port: u16,
    pub jump: Option<Box<Target>>,
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}:{}", self.user, self.host, self.port)
    }
}

/// Settings shared by every connection of a run.
#[derive(Clone)]
pub struct Connector {
    pub credentials: Credentials,
    pub known_hosts: Arc<Mutex<KnownHosts>>,
    pub accept_new: bool,
    pub connect_timeout: Duration,
    /// Caps handshakes in flight across all hosts (key exchange is CPU-heavy).
    pub handshakes: Arc<Semaphore>,
}

/// Failures callers branch on (retry, exit code, message with the fix).
#[derive(Debug, thiserror::Error)]
pub enum SshError {
    #[error(
        "{host}: cannot connect to port {port} (is sshd listening there? check the address and port)"
    )]
    Connect {
        host: String,
        port: u16,
        source: std::io::Error,
    },
    #[error(
        "{host}: no answer within {after:?} (connect_timeout); is the host up and the port right?"
    )]
    Timeout { host: String, after: Duration },
    #[error(
        "{host}: HOST KEY MISMATCH on port {port}: the host presented {presented}, but {file} expects {expected}. \
         This may be an attack. If the host was reinstalled, fix its line in {file}"
    )]
    HostKeyMismatch {
        host: String,
        port: u16,
        presented: String,
        expected: String,
        file: String,
    },
    #[error("{host}: host key {presented} is revoked in {file}")]
    HostKeyRevoked {
        host: String,
        presented: String,
        file: String,
    },
    #[error(
        "{host}: unknown host key {presented} (port {port}, not in {file}). \
         Add it to {file} (ssh-keyscan -p {port} {host}, then check the fingerprint), or pass --accept-new to trust and record it"
    )]
    HostKeyUnknown {
        host: String,
        port: u16,
        presented: String,
        file: String,
    },
    #[error(
        "{host}: the host certificate `{id}` (port {port}) is signed by an authority {file} trusts, \
         but {why}. Have the host's certificate reissued (ssh-keygen -s CA -h -n {host} ...)"
    )]
    HostCertificateInvalid {
        host: String,
        port: u16,
        id: String,
        why: String,
        file: String,
    },
    #[error("{host}: cannot record host key in {path}: {error}")]
    HostKeyRecord {
        host: String,
        path: String,
        error: String,
    },
    #[error(
        "{host}: authentication as `{user}` failed with {method}: is the public key in ~{user}/.ssh/authorized_keys?"
    )]
    AuthFailed {
        host: String,
        user: String,
        method: String,
    },
    #[error("{host}: ssh-agent: {error}")]
    Agent { host: String, error: String },
    #[error("{host}: ssh connection failed")]
    Protocol { host: String, source: russh::Error },
    #[error("{host}: cannot reach {target} from the host: {why}")]
    Forward {
        host: String,
        target: String,
        why: String,
    },
    #[error("{host}: command timed out after {after:?}: {command}")]
    CommandTimeout {
        host: String,
        after: Duration,
        command: String,
    },
    #[error("{host}: argument contains a NUL byte")]
    Nul { host: String },
}

impl SshError {
    /// Worth another attempt: the network, not the configuration, failed.
    fn is_transient(&self) -> bool {
        match self {
            SshError::Connect { source, .. } => {
                !matches!(source.kind(), std::io::ErrorKind::NotFound)
            }
            SshError::Timeout { .. } => true,
            SshError::Protocol { source, .. } => matches!(
                source,
                russh::Error::IO(_) | russh::Error::Disconnect | russh::Error::ConnectionTimeout
            ),
            _ => false,
        }
    }
}

/// How the host key check went, for `ferry check`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostKeyStatus {
    Known,
    /// A host certificate signed by an authority trusted for the host (`@cert-authority`).
    Certified,
    /// Was unknown; recorded because of `--accept-new`.
    Accepted,
}

struct Client {
    host: String,
    port: u16,
    connector: Connector,
    /// Filled by `check_server_key`: Ok(status) or the error to report.
    outcome: Arc<Mutex<Option<Result<HostKeyStatus, SshError>>>>,
}

impl client::Handler for Client {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        key: &russh::keys::PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        let result = match key {
            russh::keys::PublicKeyOrCertificate::PublicKey { key, .. } => self.verify(key),
            russh::keys::PublicKeyOrCertificate::Certificate(cert) => self.verify_certificate(cert),
        };
        let ok = result.is_ok();
        *self.outcome.lock().unwrap() = Some(result);
        Ok(ok)
    }
}

impl Client {
    /// A host certificate: trusted through a `@cert-authority` line, else its key is judged as a
    /// plain host key.
    fn verify_certificate(
        &self,
        cert: &russh::keys::Certificate,
    ) -> Result<HostKeyStatus, SshError> {
        let key = PublicKey::new(cert.public_key().clone(), "");
        let (verdict, file) = {
            let kh = self.connector.known_hosts.lock().unwrap();
            let now = crate::report::unix_now();
            let v = kh.check_certificate(&self.host, self.port, cert, now);
            (v, kh.source.clone())
        };
        match verdict {
            CertVerdict::Trusted => Ok(HostKeyStatus::Certified),
            CertVerdict::NoAuthority => self.verify(&key),
            CertVerdict::Revoked => Err(SshError::HostKeyRevoked {
                host: self.host.clone(),
                presented: format!(
                    "{} (a certificate, or the authority that signed it)",
                    known_hosts::fingerprint(&key)
                ),
                file,
            }),
            // As OpenSSH does, the certificate is dropped and its key judged as a plain key; an
            // unknown one is reported as the certificate's fault.
            CertVerdict::Invalid(why) => match self.verify(&key) {
                Err(SshError::HostKeyUnknown { .. }) => Err(SshError::HostCertificateInvalid {
                    host: self.host.clone(),
                    port: self.port,
                    id: cert.key_id().to_string(),
                    why,
                    file,
                }),
                Ok(status) => {
                    tracing::warn!(host = %self.host, "host certificate not valid ({why}); its key is known");
                    Ok(status)
                }
                other => other,
            },
        }
    }

    fn verify(&self, key: &PublicKey) -> Result<HostKeyStatus, SshError> {
        let mut kh = self.connector.known_hosts.lock().unwrap();
        let presented = known_hosts::fingerprint(key);
        match kh.check(&self.host, self.port, key) {
            Verdict::Known => Ok(HostKeyStatus::Known),
            Verdict::Mismatch { expected } => Err(SshError::HostKeyMismatch {
                host: self.host.clone(),
                port: self.port,
                presented,
                expected: expected.join(" or "),
                file: kh.source.clone(),
            }),
            Verdict::Revoked => Err(SshError::HostKeyRevoked {
                host: self.host.clone(),
                presented,
                file: kh.source.clone(),
            }),
            Verdict::Unknown if self.connector.accept_new => {
                kh.record(&self.host, self.port, key)
                    .map_err(|e| SshError::HostKeyRecord {
                        host: self.host.clone(),
                        path: kh.record_to.display().to_string(),
                        error: e.to_string(),
                    })?;
                tracing::warn!(host = %self.host, fingerprint = %presented, path = %kh.record_to.display(), "accepted new host key");
                Ok(HostKeyStatus::Accepted)
            }
            Verdict::Unknown => Err(SshError::HostKeyUnknown {
                host: self.host.clone(),
                port: self.port,
                presented,
                file: kh.source.clone(),
            }),
        }
    }
}

/// An open, authenticated connection to one host.
pub struct Session {
    handle: Handle<Client>,
    /// Keeps the bastion connection alive while this one tunnels through it.
    _jump: Option<Box<Session>>,
    pub target: Target,
    pub host_key: HostKeyStatus,
    channels: Arc<Semaphore>,
}

impl Connector {
    /// Connect, verify the host key and authenticate, retrying transient network failures with backoff.
    pub async fn connect(&self, target: &Target) -> Result<Session, SshError> {
        let mut delay = Duration::from_millis(500);
        let mut attempt = 1;
        loop {
            match self.connect_once(target).await {
                Ok(s) => return Ok(s),
                Err(e) if e.is_transient() && attempt < CONNECT_ATTEMPTS => {
                    tracing::warn!(host = %target.name, attempt, error = %e, "connect failed; retrying in {delay:?}");
                    tokio::time::sleep(delay).await;
                    delay *= 2;
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn connect_once<'a>(
        &'a self,
        target: &'a Target,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Session, SshError>> + Send + 'a>>
    {
        Box::pin(async move {
            let jump = match &target.jump {
                Some(j) => Some(Box::new(self.connect(j).await?)),
                None => None,
            };
            let _permit = self
                .handshakes
                .acquire()
                .await
                .expect("semaphore never closed");
            let after = self.connect_timeout;
            let host = target.host.clone();
            match tokio::time::timeout(after, self.handshake(target, jump.as_deref())).await {
                Ok(r) => r.map(|(handle, host_key)| Session {
                    handle,
                    _jump: jump,
                    target: target.clone(),
                    host_key,
                    channels: Arc::new(Semaphore::new(MAX_CHANNELS)),
                }),
                Err(_) => Err(SshError::Timeout { host, after }),
            }
        })
    }

    async fn handshake(
        &self,
        target: &Target,
        jump: Option<&Session>,
    ) -> Result<(Handle<Client>, HostKeyStatus), SshError> {
        let host = target.host.clone();
        let outcome = Arc::new(Mutex::new(None));
        let handler = Client {
            host: host.clone(),
            port: target.port,
            connector: self.clone(),
            outcome: outcome.clone(),
        };
        let (known, authority) = {
            let kh = self.known_hosts.lock().unwrap();
            let a = kh.has_authority(&target.host, target.port);
            (kh.algorithms(&target.host, target.port), a)
        };
        let mut config = client_config();
        let order = host_key_order(&known);
        // A host under a trusted authority is asked for its certificate first (as OpenSSH does).
        if authority {
            config.preferred.host_key_certificates = order.clone().into();
        }
        config.preferred.key = order.into();
        let config = Arc::new(config);
        let connected = match jump {
            None => {
                let tcp = tokio::net::TcpStream::connect((target.host.as_str(), target.port))
                    .await
                    .map_err(|source| SshError::Connect {
                        host: host.clone(),
                        port: target.port,
                        source,
                    })?;
                let _ = tcp.set_nodelay(true);
                client::connect_stream(config, QuickAck(tcp), handler).await
            }
            Some(bastion) => {
                let ch = bastion
                    .handle
                    .channel_open_direct_tcpip(
                        target.host.clone(),
                        target.port as u32,
                        "127.0.0.1",
                        0,
                    )
                    .await
                    .map_err(|e| SshError::Connect {
                        host: host.clone(),
                        port: target.port,
                        source: std::io::Error::other(format!(
                            "through {}: {e}",
                            bastion.target.host
                        )),
                    })?;
                client::connect_stream(config, ch.into_stream(), handler).await
            }
        };
        let mut handle = match connected {
            Ok(h) => h,
            Err(e) => {
                // A rejected host key surfaces as a generic error; report what the check found.
                if let Some(Err(hk)) = outcome.lock().unwrap().take() {
                    return Err(hk);
                }
                return Err(SshError::Protocol { host, source: e });
            }
        };
        let host_key = match outcome.lock().unwrap().take() {
            Some(Ok(s)) => s,
            Some(Err(e)) => return Err(e),
            None => unreachable!("russh checks the server key before returning a handle"),
        };
        self.authenticate(&mut handle, target).await?;
        Ok((handle, host_key))
    }

    async fn authenticate(
        &self,
        handle: &mut Handle<Client>,
        target: &Target,
    ) -> Result<(), SshError> {
        let host = target.host.clone();
        let proto = |source| SshError::Protocol {
            host: host.clone(),
            source,
        };
        let (ok, method) = match &self.credentials {
            Credentials::Key(key) => {
                let hash = handle
                    .best_supported_rsa_hash()
                    .await
                    .map_err(proto)?
                    .flatten();
                let r = handle
                    .authenticate_publickey(
                        &target.user,
                        PrivateKeyWithHashAlg::new(key.clone(), hash),
                    )
                    .await
                    .map_err(proto)?;
                (
                    r.success(),
                    format!("key {}", key.public_key().fingerprint(Default::default())),
                )
            }
            Credentials::Agent => {
                let agent_err = |e: &dyn std::fmt::Display| SshError::Agent {
                    host: host.clone(),
                    error: e.to_string(),
                };
                let mut agent = AgentClient::connect_env()
                    .await
                    .map_err(|e| agent_err(&e))?;
                let ids = agent
                    .request_identities()
                    .await
                    .map_err(|e| agent_err(&e))?;
                if ids.is_empty() {
                    return Err(agent_err(
                        &"it holds no keys: add one (ssh-add KEY), or set SSH_PRIVATE_KEY",
                    ));
                }
                let mut ok = false;
                for (tried, id) in ids.iter().enumerate() {
                    let key = id.public_key().into_owned();
                    // (A host that refused `tried` keys may close the connection: sshd's
                    // MaxAuthTries, 6 by default.)
                    let cut = |e: &dyn std::fmt::Display| match tried {
                        0 => agent_err(e),
                        _ => agent_err(&format!(
                            "the host closed the connection after refusing {tried} of its {} keys \
                             (sshd's MaxAuthTries): name the key to use with --identity FILE or \
                             SSH_PRIVATE_KEY, or load fewer keys into the agent",
                            ids.len()
                        )),
                    };
                    let hash = handle
                        .best_supported_rsa_hash()
                        .await
                        .map_err(|e| cut(&e))?
                        .flatten();
                    let r = handle
                        .authenticate_publickey_with(&target.user, key, hash, &mut agent)
                        .await
                        .map_err(|e| cut(&e))?;
                    if r.success() {
                        ok = true;
                        break;
                    }
                }
                (ok, format!("ssh-agent ({} keys)", ids.len()))
            }
        };
        if ok {
            Ok(())
        } else {
            Err(SshError::AuthFailed {
                host: target.host.clone(),
                user: target.user.clone(),
                method,
            })
        }
    }
}

/// The host key algorithms to ask for, those of the keys known for the host first (as OpenSSH
/// does): a host known by its ECDSA or RSA key is then not met with its Ed25519 key, which would
/// read as a mismatch.
fn host_key_order(known: &[russh::keys::Algorithm]) -> Vec<russh::keys::Algorithm> {
    use russh::keys::Algorithm;
    let is_known = |a: &Algorithm| {
        known.iter().any(|k| match (k, a) {
            // (One RSA key serves all three RSA signature algorithms.)
            (Algorithm::Rsa { .. }, Algorithm::Rsa { .. }) => true,
            _ => k == a,
        })
    };
    let all = russh::Preferred::DEFAULT.key;
    let (first, rest): (Vec<Algorithm>, Vec<Algorithm>) = all.iter().cloned().partition(is_known);
    first.into_iter().chain(rest).collect()
}

fn client_config() -> client::Config {
    client::Config {
        // Bulk transfer is bounded by window/RTT: give channels room.
        window_size: 32 * 1024 * 1024,
        maximum_packet_size: 65535,
        keepalive_interval: Some(Duration::from_secs(15)),
        keepalive_max: 4,
        nodelay: true,
        preferred: russh::Preferred {
            cipher: cipher_order(),
            ..russh::Preferred::DEFAULT
        },
        ..Default::default()
    }
}

/// AES-GCM first where this CPU has AES instructions, as hosts' CPUs do (OpenSSH's sshd runs it
/// through OpenSSL): it costs both ends less CPU than ChaCha20-Poly1305, OpenSSH's own first
/// choice, which stays first without them.
fn cipher_order() -> std::borrow::Cow<'static, [russh::cipher::Name]> {
    use russh::cipher::{AES_128_GCM, AES_256_GCM};
    let order = russh::Preferred::DEFAULT.cipher;
    if !hardware_aes() {
        return order;
    }
    let first = [AES_128_GCM, AES_256_GCM];
    let rest = order.iter().filter(|c| !first.contains(c));
    first.iter().chain(rest).copied().collect::<Vec<_>>().into()
}

fn hardware_aes() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("aes")
            && std::arch::is_x86_feature_detected!("pclmulqdq")
    }
    #[cfg(target_arch = "aarch64")]
    {
        std::arch::is_aarch64_feature_detected!("aes")
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        false
    }
}

/// Which stream a chunk of remote output came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

/// What a finished remote command left behind.
#[derive(Debug, Clone, Default)]
pub struct Output {
    /// The exit status; `None` if the command died of a signal or the channel closed without one.
    pub status: Option<u32>,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

impl Output {
    pub fn success(&self) -> bool {
        self.status == Some(0)
    }

    pub fn stdout_str(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    /// How it ended, in words: `exit code N`, or that no exit status came.
    pub fn exit(&self) -> String {
        self.status.map_or_else(
            || "no exit status (killed?)".to_string(),
            |c| format!("exit code {c}"),
        )
    }

    /// The last lines of stderr (or stdout), for error messages.
    pub fn tail(&self) -> String {
        let src = if self.stderr.iter().any(|b| !b.is_ascii_whitespace()) {
            &self.stderr
        } else {
            &self.stdout
        };
        let text = String::from_utf8_lossy(src);
        let lines: Vec<&str> = text.trim_end().lines().collect();
        lines[lines.len().saturating_sub(8)..].join("\n")
    }
}

/// Called with each complete line of output (without the newline) as it arrives.
pub type LineSink<'a> = &'a (dyn Fn(Stream, &[u8]) + Send + Sync);
/// An owned [`LineSink`], for output drained by a background task.
pub type SharedSink = Arc<dyn Fn(Stream, &[u8]) + Send + Sync>;

/// A running remote command whose stdin the caller streams. Dropped before it finished (a step
/// cut off), it closes its channel: the host's sshd closes the command's stdin.
pub struct Process {
    writer: Box<dyn tokio::io::AsyncWrite + Send + Unpin>,
    flow: Arc<Flow>,
    /// Taken by `finish`, `wait` or `abort`: the command's end is awaited once.
    reader: Option<tokio::task::JoinHandle<Result<Output, russh::Error>>>,
    /// Taken when the channel is closed.
    write_half: Option<russh::ChannelWriteHalf<client::Msg>>,
    host: String,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl Process {
    /// Write stdin bytes; flow control applies.
    pub async fn write(&mut self, data: &[u8]) -> std::io::Result<()> {
        for piece in data.chunks(Flow::PIECE) {
            self.flow.room().await;
            self.writer.write_all(piece).await?;
            self.flow
                .sent
                .fetch_add(piece.len() as u64, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Close stdin and wait for the command to finish. (Borrowed, so that a caller that lent the
    /// process to a step it cut off can still finish it.)
    pub async fn finish(&mut self) -> Result<Output, SshError> {
        let reader = self.take_reader()?;
        let _ = self.writer.flush().await;
        let _ = self.writer.shutdown().await;
        if let Some(w) = &self.write_half {
            let _ = w.eof().await;
        }
        self.exited(reader).await
    }

    /// Close stdin and leave the command running (its output still comes): [`Process::wait`] for
    /// its end.
    pub async fn close_stdin(&mut self) {
        let _ = self.writer.flush().await;
        let _ = self.writer.shutdown().await;
        if let Some(w) = &self.write_half {
            let _ = w.eof().await;
        }
    }

    /// Wait for the command to finish with its stdin left open: for a command that watches its
    /// stdin to learn that ferry gave up (see [`Session::run_watched`]).
    pub async fn wait(&mut self) -> Result<Output, SshError> {
        let reader = self.take_reader()?;
        let _ = self.writer.flush().await;
        self.exited(reader).await
    }

    fn take_reader(
        &mut self,
    ) -> Result<tokio::task::JoinHandle<Result<Output, russh::Error>>, SshError> {
        self.reader.take().ok_or_else(|| SshError::Protocol {
            host: self.host.clone(),
            source: russh::Error::IO(std::io::Error::other("the command was already finished")),
        })
    }

    async fn exited(
        &mut self,
        reader: tokio::task::JoinHandle<Result<Output, russh::Error>>,
    ) -> Result<Output, SshError> {
        let host = self.host.clone();
        let out = reader
            .await
            .map_err(|e| SshError::Protocol {
                host: host.clone(),
                source: russh::Error::IO(std::io::Error::other(e)),
            })?
            .map_err(|source| SshError::Protocol {
                host: host.clone(),
                source,
            })?;
        self.close().await;
        Ok(out)
    }

    async fn close(&mut self) {
        if let Some(w) = self.write_half.take() {
            let _ = w.close().await;
        }
    }

    /// Abort: close the channel without waiting.
    pub async fn abort(&mut self) {
        self.close().await;
        if let Some(reader) = self.reader.take() {
            reader.abort();
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if let (Some(w), Ok(rt)) = (
            self.write_half.take(),
            tokio::runtime::Handle::try_current(),
        ) {
            rt.spawn(async move {
                let _ = w.close().await;
            });
        }
    }
}

impl Session {
    pub fn name(&self) -> &str {
        &self.target.name
    }

    /// Start `command` (a complete shell command line) and return a handle to stream its stdin.
    pub async fn spawn(
        &self,
        command: &[u8],
        sink: Option<SharedSink>,
    ) -> Result<Process, SshError> {
        let host = self.target.host.clone();
        let permit = self
            .channels
            .clone()
            .acquire_owned()
            .await
            .expect("semaphore never closed");
        let proto = |source| SshError::Protocol {
            host: host.clone(),
            source,
        };
        let channel = self.handle.channel_open_session().await.map_err(proto)?;
        channel.exec(true, command.to_vec()).await.map_err(proto)?;
        let flow = Arc::new(Flow::new());
        let (read_half, write_half) = channel.split();
        let writer = Box::new(write_half.make_writer());
        let reader = tokio::spawn(drain(read_half, sink, flow.clone()));
        Ok(Process {
            writer,
            flow,
            reader: Some(reader),
            write_half: Some(write_half),
            host,
            _permit: permit,
        })
    }

    /// Run a complete command line, feed it `stdin`, collect output, with an optional timeout.
    pub async fn run_raw(
        &self,
        command: &[u8],
        stdin: &[u8],
        timeout: Option<Duration>,
        sink: Option<LineSink<'_>>,
    ) -> Result<Output, SshError> {
        self.run_inner(command, stdin, false, timeout, sink, command)
            .await
    }

    /// Run an argv that must not outlive ferry's wait for it (a `run` step, `ferry exec`), under
    /// [`WATCHED`]: `env` (`NAME=value`, names checked by the caller) reaches it on stdin, never
    /// in argv; output lines go to `sink` as they come; on `timeout`, or when the caller stops
    /// waiting, the host stops the command and all it started.
    pub async fn run_watched<S: AsRef<OsStr>>(
        &self,
        argv: &[S],
        env: &[(String, String)],
        timeout: Option<Duration>,
        sink: Option<LineSink<'_>>,
    ) -> Result<Output, SshError> {
        let nul = |_| SshError::Nul {
            host: self.target.host.clone(),
        };
        let mut wrapped: Vec<&OsStr> = ["sh", "-c", WATCHED, "ferry-run"]
            .into_iter()
            .map(OsStr::new)
            .collect();
        wrapped.extend(argv.iter().map(|a| a.as_ref()));
        let mut stdin = Vec::new();
        for (name, value) in env {
            stdin.extend_from_slice(format!("{name}={value}\n").as_bytes());
        }
        stdin.push(b'\n');
        let shown = shell::join(argv).map_err(nul)?;
        let cmd = shell::join(wrapped).map_err(nul)?;
        self.run_inner(&cmd, &stdin, true, timeout, sink, &shown)
            .await
    }

    /// [`Session::run_raw`], or with `keep_open` the stdin left open until the command ends.
    /// `shown` names the command in a timeout error.
    async fn run_inner(
        &self,
        command: &[u8],
        stdin: &[u8],
        keep_open: bool,
        timeout: Option<Duration>,
        sink: Option<LineSink<'_>>,
        shown: &[u8],
    ) -> Result<Output, SshError> {
        // The sink is borrowed; forward lines through a channel so the drain task can own its end.
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(Stream, Vec<u8>)>();
        let forward: Option<SharedSink> = sink.map(|_| {
            Arc::new(move |s: Stream, l: &[u8]| {
                let _ = tx.send((s, l.to_vec()));
            }) as SharedSink
        });
        let work = async {
            let mut p = self.spawn(command, forward).await?;
            if !stdin.is_empty() {
                p.write(stdin).await.map_err(|e| SshError::Protocol {
                    host: self.target.host.clone(),
                    source: russh::Error::IO(e),
                })?;
            }
            match keep_open {
                true => p.wait().await,
                false => p.finish().await,
            }
        };
        let printer = async {
            if let Some(sink) = sink {
                while let Some((s, l)) = rx.recv().await {
                    sink(s, &l);
                }
            }
        };
        let both = async {
            let (r, ()) = tokio::join!(work, printer);
            r
        };
        match timeout {
            Some(after) => tokio::time::timeout(after, both).await.unwrap_or_else(|_| {
                Err(SshError::CommandTimeout {
                    host: self.target.host.clone(),
                    after,
                    command: String::from_utf8_lossy(&shown[..shown.len().min(120)]).into_owned(),
                })
            }),
            None => both.await,
        }
    }

    /// Run an argv: every element is quoted for the remote shell, so it arrives byte for byte.
    pub async fn run<S: AsRef<OsStr>>(
        &self,
        argv: &[S],
        timeout: Option<Duration>,
    ) -> Result<Output, SshError> {
        let cmd = shell::join(argv).map_err(|_| SshError::Nul {
            host: self.target.host.clone(),
        })?;
        self.run_raw(&cmd, &[], timeout, None).await
    }

    /// Stream `script` to `sh -s` with positional `args`: the way to run anything beyond one argv.
    pub async fn run_script<S: AsRef<OsStr>>(
        &self,
        script: &str,
        args: &[S],
        timeout: Option<Duration>,
    ) -> Result<Output, SshError> {
        let mut argv: Vec<&OsStr> = vec![OsStr::new("sh"), OsStr::new("-s"), OsStr::new("--")];
        argv.extend(args.iter().map(|a| a.as_ref()));
        let cmd = shell::join(argv).map_err(|_| SshError::Nul {
            host: self.target.host.clone(),
        })?;
        self.run_raw(&cmd, script.as_bytes(), timeout, None).await
    }

    /// `sh -c SCRIPT ferry ARGS...` with `stdin` as the script's input (for scripts that read data).
    pub fn script_command<S: AsRef<OsStr>>(
        script: &str,
        args: &[S],
    ) -> Result<Vec<u8>, shell::NulError> {
        let mut argv: Vec<&OsStr> = vec![
            OsStr::new("sh"),
            OsStr::new("-c"),
            OsStr::new(script),
            OsStr::new("ferry"),
        ];
        argv.extend(args.iter().map(|a| a.as_ref()));
        shell::join(argv)
    }

    /// A TCP connection from the host to `host:port` (as the host sees it), tunnelled through this
    /// connection (an SSH direct-tcpip channel): lets ferry probe a service on the host's loopback
    /// with nothing installed there.
    pub async fn connect_tcp(
        &self,
        host: &str,
        port: u16,
    ) -> Result<impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + use<>, SshError>
    {
        let ch = self
            .handle
            .channel_open_direct_tcpip(host.to_string(), port as u32, "127.0.0.1", 0)
            .await
            .map_err(|source| match source {
                // (sshd answers for the address: the SSH connection itself is fine.)
                russh::Error::ChannelOpenFailure(why) => SshError::Forward {
                    host: self.target.host.clone(),
                    target: format!("{host}:{port}"),
                    why: match why {
                        russh::ChannelOpenFailure::ConnectFailed => {
                            "nothing accepts connections there".into()
                        }
                        russh::ChannelOpenFailure::AdministrativelyProhibited => {
                            "sshd forbids forwarding (AllowTcpForwarding)".into()
                        }
                        other => format!("{other:?}"),
                    },
                },
                source => SshError::Protocol {
                    host: self.target.host.clone(),
                    source,
                },
            })?;
        Ok(ch.into_stream())
    }

    pub async fn close(self) {
        let _ = self
            .handle
            .disconnect(Disconnect::ByApplication, "", "en")
            .await;
    }
}

/// A TCP stream that acknowledges what it reads at once. sshd sets no TCP_NODELAY on exec
/// sessions, so the last small packets of a command (exit status, EOF, close) wait for our
/// acknowledgement of the packet before them, which Linux delays by up to 40 ms: a stall at the
/// end of every remote command. Quick-ack mode lapses by itself, so it is set again on each read.
struct QuickAck(tokio::net::TcpStream);

impl tokio::io::AsyncRead for QuickAck {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let polled = std::pin::Pin::new(&mut self.0).poll_read(cx, buf);
        #[cfg(any(target_os = "linux", target_os = "android"))]
        if let std::task::Poll::Ready(Ok(())) = polled {
            let _ = socket2::SockRef::from(&self.0).set_tcp_quickack(true);
        }
        polled
    }
}

impl tokio::io::AsyncWrite for QuickAck {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// Keeps a process's stdin from filling the host's whole channel window. OpenSSH's sshd keeps
/// what its child has not read yet in a buffer that it grows by copying it whole, packet by packet:
/// with a window's worth (2 MiB) waiting, it spent a core on copies and page faults while a
/// stream's plain part went through, and stayed that slow. Here at most [`Flow::limit`] is
/// unacknowledged (the host's window adjusts say what its child read). Where adjusts come late (a
/// long round trip, a host that adjusts only past half its window), the limit doubles at each
/// wait that runs out, up to the window itself.
struct Flow {
    /// At most this much unacknowledged.
    limit: AtomicU64,
    sent: AtomicU64,
    adjusts: Mutex<Adjusts>,
    adjusted: tokio::sync::Notify,
}

/// What the host's window adjusts said.
#[derive(Default)]
struct Adjusts {
    /// The most the window held after one: its size. OpenSSH opens a session's window empty,
    /// then adjusts it to its size (a host that opens it full is learnt from its first adjust).
    window: u32,
    /// The window left after the last one, and [`Flow::sent`] then.
    left: u32,
    sent: u64,
}

impl Flow {
    const PIECE: usize = 32 * 1024;
    const PATIENCE: Duration = Duration::from_millis(20);

    fn new() -> Flow {
        Flow {
            limit: AtomicU64::new(256 * 1024),
            sent: AtomicU64::new(0),
            adjusts: Mutex::default(),
            adjusted: tokio::sync::Notify::new(),
        }
    }

    /// The window's size as far as known (0 before the first adjust), and what is in flight.
    fn state(&self) -> (u32, u64) {
        let a = self.adjusts.lock().unwrap();
        let since = self.sent.load(Ordering::Relaxed).saturating_sub(a.sent);
        (a.window, u64::from(a.window.saturating_sub(a.left)) + since)
    }

    /// Wait until a piece may go.
    async fn room(&self) {
        loop {
            let limit = self.limit.load(Ordering::Relaxed);
            let adjusted = self.adjusted.notified();
            let (window, in_flight) = self.state();
            if (window > 0 && limit >= u64::from(window)) || in_flight < limit {
                return;
            }
            if tokio::time::timeout(Flow::PATIENCE, adjusted)
                .await
                .is_err()
            {
                self.limit.store(limit.saturating_mul(2), Ordering::Relaxed);
            }
        }
    }

    /// The host adjusted the window: `left` is what remains of it.
    fn adjust(&self, left: u32) {
        let mut a = self.adjusts.lock().unwrap();
        a.window = a.window.max(left);
        a.left = left;
        a.sent = self.sent.load(Ordering::Relaxed);
        drop(a);
        self.adjusted.notify_waiters();
    }
}

/// Read a channel to its end: always drain, or the whole connection stalls.
async fn drain(
    mut read: russh::ChannelReadHalf,
    sink: Option<SharedSink>,
    flow: Arc<Flow>,
) -> Result<Output, russh::Error> {
    let mut out = Output::default();
    let (mut line_out, mut line_err) = (Vec::new(), Vec::new());
    while let Some(msg) = read.wait().await {
        match msg {
            ChannelMsg::Data { data } => {
                out.stdout.extend_from_slice(&data);
                if let Some(s) = &sink {
                    emit_lines(&mut line_out, &data, Stream::Stdout, s.as_ref());
                }
            }
            ChannelMsg::ExtendedData { data, ext: 1 } => {
                out.stderr.extend_from_slice(&data);
                if let Some(s) = &sink {
                    emit_lines(&mut line_err, &data, Stream::Stderr, s.as_ref());
                }
            }
            ChannelMsg::ExitStatus { exit_status } => out.status = Some(exit_status),
            ChannelMsg::WindowAdjusted { new_size } => flow.adjust(new_size),
            ChannelMsg::Close => break,
            _ => {}
        }
    }
    if let Some(s) = &sink {
        if !line_out.is_empty() {
            s(Stream::Stdout, &line_out);
        }
        if !line_err.is_empty() {
            s(Stream::Stderr, &line_err);
        }
    }
    Ok(out)
}

fn emit_lines(
    buf: &mut Vec<u8>,
    data: &[u8],
    stream: Stream,
    sink: &(dyn Fn(Stream, &[u8]) + Send + Sync),
) {
    buf.extend_from_slice(data);
    while let Some(pos) = buf.iter().position(|&b| b == b'\n') {
        sink(stream, &buf[..pos]);
        buf.drain(..=pos);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A piece waits while the limit is unacknowledged, until an adjust says the host's child
    /// read it; a wait that runs out doubles the limit, which ends at the window.
    #[tokio::test]
    async fn flow_waits_for_adjusts_and_grows_when_they_are_late() {
        let window = 2 << 20;
        let flow = Arc::new(Flow::new());
        flow.adjust(window); // OpenSSH opens the window after the channel.
        flow.room().await;
        flow.sent.store(300 << 10, Ordering::Relaxed);
        assert_eq!(flow.state().1, 300 << 10);
        let f = flow.clone();
        let later = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(5)).await;
            f.adjust(window - (100 << 10)); // the child read all but 100 KiB
        });
        let start = std::time::Instant::now();
        flow.room().await;
        later.await.unwrap();
        assert!(start.elapsed() < Flow::PATIENCE, "{:?}", start.elapsed());
        assert_eq!(flow.state().1, 100 << 10);
        assert_eq!(flow.limit.load(Ordering::Relaxed), 256 << 10);
        // No adjust: each wait runs out and doubles the limit, until it is the window.
        flow.sent.store(window as u64 * 4, Ordering::Relaxed);
        flow.room().await;
        assert_eq!(flow.limit.load(Ordering::Relaxed), window as u64);
    }

    /// With AES instructions AES-GCM comes first; the order keeps every default cipher, once.
    #[test]
    fn cipher_order_puts_aes_gcm_first_with_hardware_aes() {
        let order = cipher_order();
        let default = russh::Preferred::DEFAULT.cipher;
        assert!(default.iter().all(|c| order.contains(c)));
        let mut names: Vec<&str> = order.iter().map(|c| c.as_ref()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), order.len());
        let first = if hardware_aes() {
            russh::cipher::AES_128_GCM
        } else {
            default[0]
        };
        assert_eq!(order[0], first);
    }
}
