//! A local TCP proxy that delays chosen requests: faults on the real network path of a
//! process under test (e.g. slow S3 uploads, so that a kill lands between a prepared
//! checkpoint and its commit).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// A proxy on a free port of 127.0.0.1 forwarding to `upstream`. A request (a chunk the client
/// sends) that starts with `delayed_prefix` (e.g. `b"PUT "`, an HTTP request line) is passed on
/// at once, so the server applies it, but the answer is held back for `delay`: a client killed
/// meanwhile never learns that its request was applied. Stops when dropped.
#[derive(Debug)]
pub struct DelayProxy {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl DelayProxy {
    /// Starts the proxy.
    ///
    /// # Errors
    /// No port could be bound.
    pub async fn start(
        upstream: SocketAddr,
        delayed_prefix: &'static [u8],
        delay: Duration,
    ) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding the proxy")?;
        let addr = listener.local_addr()?;
        let prefix = Arc::new(delayed_prefix);
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let prefix = prefix.clone();
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    let (mut cr, mut cw) = client.into_split();
                    let (mut sr, mut sw) = server.into_split();
                    let delayed = std::sync::atomic::AtomicBool::new(false);
                    let up = async {
                        let mut buf = vec![0u8; 64 * 1024];
                        loop {
                            let n = match cr.read(&mut buf).await {
                                Ok(0) | Err(_) => break,
                                Ok(n) => n,
                            };
                            if buf[..n].starts_with(&prefix) {
                                delayed.store(true, std::sync::atomic::Ordering::SeqCst);
                            }
                            if sw.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                        let _ = sw.shutdown().await;
                    };
                    let down = async {
                        let mut buf = vec![0u8; 64 * 1024];
                        loop {
                            let n = match sr.read(&mut buf).await {
                                Ok(0) | Err(_) => break,
                                Ok(n) => n,
                            };
                            if delayed.swap(false, std::sync::atomic::Ordering::SeqCst) {
                                tokio::time::sleep(delay).await;
                            }
                            if cw.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                        let _ = cw.shutdown().await;
                    };
                    tokio::join!(up, down);
                });
            }
        });
        Ok(Self { addr, task })
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for DelayProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}
