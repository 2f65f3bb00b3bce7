//! A real TCP proxy on a free loopback port in front of a server (Redis), that a test tells to
//! lose what a real network loses: a connection cut just before a reply, the replies of one
//! connection while the server still runs every request it received (each of these once), or
//! everything, until healed (a partition: connections are cut and new ones closed at once); or
//! be slow: every reply held back a while.

#![allow(dead_code)] // not every test uses every fault

use crate::harness::port;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// The fault the proxy makes once, when its trigger is seen.
#[derive(Default)]
struct Faults {
    /// Close the connection whose server reply holds this, before forwarding the reply.
    cut_before_reply: Option<Vec<u8>>,
    /// Once requests (all connections together) have held this as many times as the count, the
    /// connection that carried the last one gets no more replies.
    lose_replies_after: Option<(Vec<u8>, usize)>,
    /// How many times requests have held the pattern so far.
    seen: usize,
    /// How many faults happened.
    made: usize,
    /// While true, every connection is cut and new ones are closed at once.
    severed: bool,
    /// How long every reply is held back before it is forwarded.
    reply_delay: Option<Duration>,
}

pub struct Proxy {
    pub port: u16,
    faults: Arc<Mutex<Faults>>,
    tasks: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl Proxy {
    /// Listens on a free loopback port and forwards every connection to `upstream` there.
    pub async fn start(upstream: u16) -> Proxy {
        let port = port();
        let listener = TcpListener::bind(("127.0.0.1", port))
            .await
            .expect("bind the proxy");
        let faults = Arc::new(Mutex::new(Faults::default()));
        let tasks = Arc::new(Mutex::new(Vec::new()));
        let accept = tokio::spawn(accept(
            listener,
            upstream,
            Arc::clone(&faults),
            Arc::clone(&tasks),
        ));
        tasks.lock().unwrap().push(accept);
        Proxy {
            port,
            faults,
            tasks,
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The next server reply that holds `pattern` is not forwarded: its connection is closed.
    pub fn cut_before_reply(&self, pattern: &str) {
        self.faults.lock().unwrap().cut_before_reply = Some(pattern.as_bytes().to_vec());
    }

    /// Once requests have held `pattern` `count` times, the connection carrying the last of them
    /// gets no more replies (the server still gets and runs its requests).
    pub fn lose_replies_after(&self, pattern: &str, count: usize) {
        let mut faults = self.faults.lock().unwrap();
        faults.lose_replies_after = Some((pattern.as_bytes().to_vec(), count));
        faults.seen = 0;
    }

    /// Holds every server reply back for `delay` before forwarding it.
    pub fn delay_replies(&self, delay: Duration) {
        self.faults.lock().unwrap().reply_delay = Some(delay);
    }

    /// Cuts every connection, and closes new ones at once until [`Proxy::heal`].
    pub fn sever(&self) {
        self.faults.lock().unwrap().severed = true;
        let mut tasks = self.tasks.lock().unwrap();
        // The first task accepts connections; the others relay one each.
        for task in tasks.drain(1..) {
            task.abort();
        }
    }

    /// Forwards connections again after [`Proxy::sever`].
    pub fn heal(&self) {
        self.faults.lock().unwrap().severed = false;
    }

    /// How many faults the proxy has made.
    pub fn faults_made(&self) -> usize {
        self.faults.lock().unwrap().made
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Ok(tasks) = self.tasks.lock() {
            for task in tasks.iter() {
                task.abort();
            }
        }
    }
}

async fn accept(
    listener: TcpListener,
    upstream: u16,
    faults: Arc<Mutex<Faults>>,
    tasks: Arc<Mutex<Vec<JoinHandle<()>>>>,
) {
    while let Ok((client, _)) = listener.accept().await {
        if faults.lock().unwrap().severed {
            continue;
        }
        let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)).await else {
            continue;
        };
        let task = tokio::spawn(relay(client, server, Arc::clone(&faults)));
        tasks.lock().unwrap().push(task);
    }
}

/// How many times `pattern` ends inside `chunk`, given the bytes before it in `tail` (kept
/// updated), so a pattern split over two reads counts once.
fn occurrences(tail: &mut Vec<u8>, chunk: &[u8], pattern: &[u8]) -> usize {
    let mut window = std::mem::take(tail);
    let old = window.len();
    window.extend_from_slice(chunk);
    let count = window
        .windows(pattern.len().max(1))
        .enumerate()
        .filter(|(start, bytes)| start + bytes.len() > old && *bytes == pattern)
        .count();
    let keep = pattern.len().saturating_sub(1).min(window.len());
    *tail = window[window.len() - keep..].to_vec();
    count
}

/// Forwards one connection both ways, making the faults asked for.
async fn relay(client: TcpStream, server: TcpStream, faults: Arc<Mutex<Faults>>) {
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    let lost = Arc::new(Mutex::new(false));
    let requests = {
        let faults = Arc::clone(&faults);
        let lost = Arc::clone(&lost);
        let mut tail = Vec::new();
        pump(client_read, server_write, move |chunk| {
            let mut faults = faults.lock().unwrap();
            if let Some((pattern, count)) = faults.lose_replies_after.clone() {
                faults.seen += occurrences(&mut tail, chunk, &pattern);
                if faults.seen >= count {
                    faults.lose_replies_after = None;
                    faults.made += 1;
                    *lost.lock().unwrap() = true;
                }
            }
            Forward::Pass
        })
    };
    let replies = pump(server_read, client_write, move |chunk| {
        let mut faults = faults.lock().unwrap();
        let cut = faults
            .cut_before_reply
            .as_ref()
            .is_some_and(|pattern| chunk.windows(pattern.len()).any(|w| w == pattern));
        if cut {
            faults.cut_before_reply = None;
            faults.made += 1;
            return Forward::Cut;
        }
        if *lost.lock().unwrap() {
            return Forward::Drop;
        }
        faults.reply_delay.map_or(Forward::Pass, Forward::Late)
    });
    // Why select: either direction ending ends the connection; dropping both halves closes it.
    tokio::select! {
        _ = requests => {}
        _ = replies => {}
    }
}

/// What becomes of a chunk on its way through the proxy.
enum Forward {
    Pass,
    /// Not sent on: lost.
    Drop,
    /// The connection ends before it.
    Cut,
    /// Sent on after this long.
    Late(Duration),
}

/// Copies chunks from `from` to `to` until either side ends, asking `inspect` about each.
async fn pump<R, W>(mut from: R, mut to: W, mut inspect: impl FnMut(&[u8]) -> Forward)
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        let Ok(read) = from.read(&mut buffer).await else {
            return;
        };
        if read == 0 {
            return;
        }
        let chunk = &buffer[..read];
        match inspect(chunk) {
            Forward::Cut => return,
            Forward::Drop => continue,
            Forward::Late(delay) => tokio::time::sleep(delay).await,
            Forward::Pass => {}
        }
        if to.write_all(chunk).await.is_err() {
            return;
        }
    }
}
