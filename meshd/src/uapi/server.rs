//! The UAPI socket `<uapi_dir>/<interface>.sock`: bound before the data plane starts (a live
//! socket of someone else refuses the start, a stale file is replaced), served on the host's
//! tokio loop (one task per connection, bounded in size, time and number), removed on a
//! clean stop.

use std::io;
use std::os::unix::fs::{DirBuilderExt as _, FileTypeExt as _, MetadataExt as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot, Semaphore};

use super::proto::{self, DeviceState, Errno, Request, SetRequest, END};

/// Largest request read (a `wg setconf` of thousands of allowed IPs fits).
pub const MAX_REQUEST: usize = 1 << 20;
/// A connection is closed after this long, whatever it is doing.
pub const CONNECTION_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once; more are closed at once.
pub const MAX_CONNECTIONS: usize = 8;

/// A `set=1` for the host: apply it, then answer with the errno.
#[derive(Debug)]
pub struct SetCall {
    /// The parsed request.
    pub request: SetRequest,
    /// Where the host's answer goes.
    pub reply: oneshot::Sender<Errno>,
}

/// The bound socket, not yet served (dropping it removes the file).
pub struct Listener {
    file: SocketFile,
    listener: std::os::unix::net::UnixListener,
}

/// The socket file we made; dropping it removes the file if it is still that one.
struct SocketFile {
    path: PathBuf,
    /// Its (device, inode).
    id: (u64, u64),
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        if let Ok(meta) = std::fs::symlink_metadata(&self.path) {
            if (meta.dev(), meta.ino()) == self.id {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }
}

/// `<dir>/<interface>.sock`.
pub fn socket_path(dir: &Path, interface: &str) -> PathBuf {
    dir.join(format!("{interface}.sock"))
}

impl Listener {
    /// Creates `dir` (0755) if missing and binds `<dir>/<interface>.sock` (0600). A socket
    /// file someone still listens on is never touched: the error names it; one nobody
    /// listens on (left by a killed process) is replaced.
    pub fn bind(dir: &Path, interface: &str) -> anyhow::Result<Listener> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(dir)
            .with_context(|| format!("creating the UAPI directory {}", dir.display()))?;
        let path = socket_path(dir, interface);
        let listener = match bind_private(&path) {
            Ok(l) => l,
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
                replace_stale(&path)?;
                bind_private(&path)
                    .with_context(|| format!("binding the UAPI socket {}", path.display()))?
            }
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("binding the UAPI socket {}", path.display()))
            }
        };
        let meta = std::fs::symlink_metadata(&path)
            .with_context(|| format!("the UAPI socket {}", path.display()))?;
        Ok(Listener {
            file: SocketFile {
                path,
                id: (meta.dev(), meta.ino()),
            },
            listener,
        })
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.file.path
    }

    /// Serves the socket on the current tokio runtime: `get=1` from `state()`, `set=1` sent
    /// to the host through `sets`. The returned [`Server`] stops it and removes the file when
    /// dropped.
    pub fn serve(
        self,
        state: impl Fn() -> DeviceState + Send + Sync + 'static,
        sets: mpsc::Sender<SetCall>,
    ) -> anyhow::Result<Server> {
        self.listener.set_nonblocking(true)?;
        let listener = tokio::net::UnixListener::from_std(self.listener)?;
        let state = Arc::new(state);
        let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        let task = tokio::spawn(async move {
            loop {
                let conn = match listener.accept().await {
                    Ok((conn, _)) => conn,
                    Err(e) => {
                        tracing::warn!(error = %e, "UAPI accept");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                if !allowed(&conn) {
                    continue;
                }
                let Ok(slot) = slots.clone().try_acquire_owned() else {
                    continue;
                };
                let (state, sets) = (state.clone(), sets.clone());
                tokio::spawn(async move {
                    let _slot = slot;
                    let _ =
                        tokio::time::timeout(CONNECTION_TIMEOUT, connection(conn, &*state, &sets))
                            .await;
                });
            }
        });
        Ok(Server {
            _file: self.file,
            task,
        })
    }
}

/// Binds with a umask that leaves the socket 0600 from its first moment (a chmod after the
/// bind would leave a window in which anyone could connect and read the private key).
/// Called at start-up, before any other thread makes files.
fn bind_private(path: &Path) -> io::Result<std::os::unix::net::UnixListener> {
    // SAFETY: umask only swaps the process's file mode mask; it is restored right after.
    let old = unsafe { libc::umask(0o177) };
    let r = std::os::unix::net::UnixListener::bind(path);
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    r
}

/// `path` is taken: refuses if someone listens on it (or it is not a socket), else removes it.
fn replace_stale(path: &Path) -> anyhow::Result<()> {
    let meta = std::fs::symlink_metadata(path)
        .with_context(|| format!("the UAPI socket {}", path.display()))?;
    if !meta.file_type().is_socket() {
        bail!(
            "{} exists and is not a socket; remove it or set another uapi_dir",
            path.display()
        );
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => bail!(
            "the UAPI socket {} is in use (another meshd, wireguard-go or boringtun serves \
             this interface name): stop it, or give this meshd another directory \
             ([interface] uapi_dir, `meshd up --uapi-dir`)",
            path.display()
        ),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            tracing::info!(path = %path.display(), "replacing a stale UAPI socket");
            std::fs::remove_file(path)
                .with_context(|| format!("removing the stale UAPI socket {}", path.display()))
        }
        Err(e) => Err(e).with_context(|| format!("checking the UAPI socket {}", path.display())),
    }
}

/// Only root and meshd's own user may talk to the socket (its mode says so too).
fn allowed(conn: &UnixStream) -> bool {
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    conn.peer_cred()
        .is_ok_and(|c| c.uid() == 0 || c.uid() == me)
}

/// Serves one connection: requests one after the other until it closes or errs.
async fn connection<F: Fn() -> DeviceState>(
    mut conn: UnixStream,
    state: &F,
    sets: &mpsc::Sender<SetCall>,
) {
    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    loop {
        let Some(request) = read_request(&mut conn, &mut buf).await else {
            return;
        };
        let answer = match request {
            Ok(Request::Get) => proto::format_get(&state()),
            Ok(Request::Set(request)) => {
                let (reply, answer) = oneshot::channel();
                let errno = match sets.send(SetCall { request, reply }).await {
                    Ok(()) => answer.await.unwrap_or(Errno::EIO),
                    Err(_) => Errno::EIO,
                };
                proto::status_line(errno)
            }
            Err(errno) => proto::status_line(errno),
        };
        if conn.write_all(answer.as_bytes()).await.is_err() {
            return;
        }
        if buf.len() > MAX_REQUEST {
            // Answered E2BIG: where the next request starts is unknown.
            return;
        }
    }
}

/// Reads the next request (up to its blank line) from `conn`, keeping what follows it in
/// `buf`. `None`: the connection ended, or sent something that is no request (closed without
/// an answer, as wireguard-go does). `Some(Err)`: answer with that errno.
async fn read_request(conn: &mut UnixStream, buf: &mut Vec<u8>) -> Option<Result<Request, Errno>> {
    let mut chunk = [0u8; 4096];
    // Bytes of `buf` already searched for the end.
    let mut scanned: usize = 0;
    loop {
        let from = scanned.saturating_sub(END.len() - 1);
        scanned = buf.len();
        if let Some(end) = find(&buf[from..], END.as_bytes()).map(|i| i + from) {
            let rest = buf.split_off(end + END.len());
            let text = std::mem::replace(buf, rest);
            let Ok(text) = std::str::from_utf8(&text) else {
                return Some(Err(Errno::EINVAL));
            };
            return match proto::parse_request(text) {
                Ok(r) => Some(Ok(r)),
                Err(Some(errno)) => Some(Err(errno)),
                Err(None) => None,
            };
        }
        // An unknown operation is known from its first line.
        if let Some(nl) = buf.iter().position(|&b| b == b'\n') {
            if !matches!(&buf[..nl], b"get=1" | b"set=1") {
                return None;
            }
        }
        if buf.len() > MAX_REQUEST {
            return Some(Err(Errno::E2BIG));
        }
        match conn.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// The served socket. Dropping it stops serving and removes the socket file (if it is still
/// the one we made).
pub struct Server {
    // Dropped after `Drop::drop` has stopped the task.
    _file: SocketFile,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    fn state() -> DeviceState {
        DeviceState {
            private_key: [1; 32],
            listen_port: 51820,
            fwmark: None,
            peers: vec![],
        }
    }

    async fn ask(path: &Path, req: &str) -> String {
        let mut c = UnixStream::connect(path).await.unwrap();
        c.write_all(req.as_bytes()).await.unwrap();
        let mut out = String::new();
        let mut buf = [0u8; 4096];
        // Until the blank line that ends an answer, or the close.
        while !out.ends_with("\n\n") {
            match c.read(&mut buf).await.unwrap() {
                0 => break,
                n => out.push_str(std::str::from_utf8(&buf[..n]).unwrap()),
            }
        }
        out
    }

    #[tokio::test]
    async fn binds_privately_refuses_a_live_socket_and_replaces_a_stale_one() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("run/wireguard");
        let l = Listener::bind(&dir, "mesh0").unwrap();
        let path = socket_path(&dir, "mesh0");
        assert_eq!(l.path(), path);
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o755);
        assert_eq!(mode(&path), 0o600);
        // Live: refused, naming the path, and left alone.
        let e = Listener::bind(&dir, "mesh0").err().unwrap();
        assert!(
            format!("{e:#}").contains(&path.display().to_string()),
            "{e:#}"
        );
        assert!(std::os::unix::net::UnixStream::connect(&path).is_ok());
        // Dropped: removed.
        drop(l);
        assert!(!path.exists());
        // Stale (a socket nobody listens on, as a killed process leaves it): replaced.
        let stale = std::os::unix::net::UnixListener::bind(&path).unwrap();
        drop(stale);
        assert!(path.exists());
        let l = Listener::bind(&dir, "mesh0").unwrap();
        assert!(std::os::unix::net::UnixStream::connect(l.path()).is_ok());
        drop(l);
        // Not a socket: refused, never removed.
        std::fs::write(&path, "x").unwrap();
        let e = Listener::bind(&dir, "mesh0").err().unwrap();
        assert!(format!("{e:#}").contains("not a socket"), "{e:#}");
        assert!(path.exists());
    }

    #[tokio::test]
    async fn serves_get_and_set_and_answers_bad_requests_with_an_errno() {
        let tmp = tempfile::tempdir().unwrap();
        let l = Listener::bind(tmp.path(), "mesh0").unwrap();
        let path = l.path().to_path_buf();
        let (tx, mut rx) = mpsc::channel::<SetCall>(4);
        let server = l.serve(state, tx).unwrap();
        // The host's side: refuse a listen port change, accept anything else.
        tokio::spawn(async move {
            while let Some(call) = rx.recv().await {
                let e = if call.request.listen_port.is_some() {
                    Errno::EOPNOTSUPP
                } else {
                    Errno::OK
                };
                call.reply.send(e).unwrap();
            }
        });
        let got = ask(&path, "get=1\n\n").await;
        assert_eq!(got, proto::format_get(&state()));
        assert_eq!(
            ask(&path, "set=1\nreplace_peers=true\n\n").await,
            "errno=0\n\n"
        );
        assert_eq!(
            ask(&path, "set=1\nlisten_port=1\n\n").await,
            "errno=-95\n\n"
        );
        assert_eq!(ask(&path, "set=1\nbogus\n\n").await, "errno=-71\n\n");
        assert_eq!(ask(&path, "set=1\nfoo=bar\n\n").await, "errno=-22\n\n");
        // Two requests on one connection, as the protocol allows.
        let mut c = UnixStream::connect(&path).await.unwrap();
        c.write_all(b"set=1\n\nget=1\n\n").await.unwrap();
        c.shutdown().await.unwrap();
        let mut two = String::new();
        c.read_to_string(&mut two).await.unwrap();
        assert_eq!(two, format!("errno=0\n\n{}", proto::format_get(&state())));
        // An unknown operation: closed without an answer.
        assert_eq!(ask(&path, "hello=1\n").await, "");
        // Too long: refused without reading it all.
        let huge = format!(
            "set=1\n{}",
            "allowed_ip=10.0.0.0/8\n".repeat(MAX_REQUEST / 20)
        );
        let (mut r, mut w) = UnixStream::connect(&path).await.unwrap().into_split();
        let writer = tokio::spawn(async move { w.write_all(huge.as_bytes()).await.is_ok() });
        let mut out = vec![0u8; 64];
        let n = r.read(&mut out).await.unwrap();
        assert_eq!(&out[..n], b"errno=-7\n\n");
        // Then the connection is closed: the rest of the write fails.
        assert!(!writer.await.unwrap());
        drop(server);
        assert!(!path.exists());
    }

    #[tokio::test]
    async fn a_silent_client_does_not_block_others() {
        let tmp = tempfile::tempdir().unwrap();
        let l = Listener::bind(tmp.path(), "mesh0").unwrap();
        let path = l.path().to_path_buf();
        let (tx, _rx) = mpsc::channel::<SetCall>(4);
        let _server = l.serve(state, tx).unwrap();
        // Half a request, then nothing.
        let mut idle = Vec::new();
        for _ in 0..MAX_CONNECTIONS - 1 {
            let mut c = UnixStream::connect(&path).await.unwrap();
            c.write_all(b"get=1\n").await.unwrap();
            idle.push(c);
        }
        let got = tokio::time::timeout(Duration::from_secs(5), ask(&path, "get=1\n\n"))
            .await
            .expect("served while others idle");
        assert_eq!(got, proto::format_get(&state()));
    }
}
