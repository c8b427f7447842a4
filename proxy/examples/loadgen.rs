//! Load generator for `bench/proxy-bench.sh`: a 1-byte echo server, a request/response
//! latency probe and a new-connection rate probe. Plain blocking sockets, one thread per
//! connection, so that it costs every path under test the same.
//!
//! ```text
//! loadgen serve PORT                     echo server on 0.0.0.0:PORT, and a holding server on PORT+1
//! loadgen latency ADDRS COUNT            1-byte round trips on one connection per address:
//!                                        "p50_us p99_us", one line per address
//! loadgen rate ADDRS SECONDS THREADS     new connections per second, each one 1-byte exchange:
//!                                        "per_second failed", one line per address
//! loadgen hold ADDR COUNT...             opens connections to a holding server until COUNT are
//!                                        open, one 1-byte exchange each, prints "held COUNT" and
//!                                        waits for a line on stdin; then the next COUNT
//! ```
//!
//! ADDRS is one address or several separated by commas. With several, the probe takes turns:
//! a batch of round trips (or a slice of time) on each in order, again and again, so that
//! the background load of a shared machine falls on every address alike.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The byte a rate probe sends: the server answers and then closes first, so TIME_WAIT
/// lands on the server side and the client's ephemeral ports are not exhausted.
const ANSWER_AND_CLOSE: u8 = b'c';

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |i: usize| args.get(i).unwrap_or_else(|| usage());
    match args.get(1).map(String::as_str) {
        Some("serve") => serve(arg(2).parse().unwrap_or_else(|_| usage())),
        Some("latency") => latency(&parse_addrs(arg(2)), arg(3).parse().unwrap_or_else(|_| usage())),
        Some("hold") => hold(parse_addr(arg(2)), args[3..].iter().map(|n| n.parse().unwrap_or_else(|_| usage())).collect()),
        Some("rate") => {
            rate(&parse_addrs(arg(2)), arg(3).parse().unwrap_or_else(|_| usage()), arg(4).parse().unwrap_or_else(|_| usage()))
        }
        _ => usage(),
    }
}

fn usage() -> ! {
    eprintln!("usage: loadgen serve PORT | latency ADDRS COUNT | rate ADDRS SECONDS THREADS | hold ADDR COUNT...");
    std::process::exit(2)
}

fn parse_addr(text: &str) -> SocketAddr {
    text.parse().unwrap_or_else(|_| usage())
}

fn parse_addrs(text: &str) -> Vec<SocketAddr> {
    text.split(',').map(parse_addr).collect()
}

fn serve(port: u16) {
    let listener = TcpListener::bind(("0.0.0.0", port)).expect("bind");
    let holding = TcpListener::bind(("0.0.0.0", port + 1)).expect("bind");
    std::thread::spawn(move || hold_connections(holding));
    for stream in listener.incoming().flatten() {
        std::thread::spawn(move || echo(stream));
    }
}

fn echo(mut stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let mut byte = [0u8; 1];
    while let Ok(1) = stream.read(&mut byte) {
        if stream.write_all(&byte).is_err() || byte[0] == ANSWER_AND_CLOSE {
            return;
        }
    }
}

/// Answers the first byte of each connection and then keeps it open, idle, until the client
/// closes it: one task per connection on one thread, so that thousands cost little.
fn hold_connections(listener: TcpListener) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    runtime.block_on(async {
        listener.set_nonblocking(true).expect("nonblocking");
        let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
        loop {
            let Ok((mut stream, _)) = listener.accept().await else { continue };
            tokio::spawn(async move {
                let mut byte = [0u8; 1];
                if stream.read_exact(&mut byte).await.is_ok() && stream.write_all(&byte).await.is_ok() {
                    // Returns at the client's FIN (or reset): then this side closes too.
                    let _ = stream.read(&mut byte).await;
                }
            });
        }
    });
}

fn hold(addr: SocketAddr, counts: Vec<usize>) {
    let mut held = Vec::new();
    for count in counts {
        while held.len() < count {
            let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
            stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut byte = [b'h'];
            stream.write_all(&byte).unwrap();
            stream.read_exact(&mut byte).expect("answer");
            held.push(stream);
        }
        println!("held {count}");
        let mut line = String::new();
        std::io::stdin().read_line(&mut line).unwrap();
    }
}

/// Round trips per turn on one address when the latency probe takes turns.
const TRIPS_PER_TURN: usize = 100;

/// A connection's turn in the rate probe.
const RATE_TURN: Duration = Duration::from_millis(200);

fn latency(addrs: &[SocketAddr], count: usize) {
    let mut streams: Vec<TcpStream> = addrs
        .iter()
        .map(|addr| {
            let stream = TcpStream::connect(addr).expect("connect");
            stream.set_nodelay(true).unwrap();
            stream
        })
        .collect();
    let warmup = count / 10;
    let mut samples: Vec<Vec<Duration>> = addrs.iter().map(|_| Vec::with_capacity(count)).collect();
    let mut byte = [b'p'];
    let mut done = 0;
    while done < warmup + count {
        let turn = TRIPS_PER_TURN.min(warmup + count - done);
        for (stream, samples) in streams.iter_mut().zip(&mut samples) {
            for i in done..done + turn {
                let started = Instant::now();
                stream.write_all(&byte).unwrap();
                stream.read_exact(&mut byte).unwrap();
                if i >= warmup {
                    samples.push(started.elapsed());
                }
            }
        }
        done += turn;
    }
    for mut samples in samples {
        samples.sort();
        let percentile = |p: usize| samples[(samples.len() * p / 100).min(samples.len() - 1)].as_secs_f64() * 1e6;
        println!("{:.1} {:.1}", percentile(50), percentile(99));
    }
}

/// Each address gets `seconds` in all, in turns of RATE_TURN.
fn rate(addrs: &[SocketAddr], seconds: u64, threads: usize) {
    let done: Arc<Vec<AtomicU64>> = Arc::new(addrs.iter().map(|_| AtomicU64::new(0)).collect());
    let failed: Arc<Vec<AtomicU64>> = Arc::new(addrs.iter().map(|_| AtomicU64::new(0)).collect());
    // The address whose turn it is; addrs.len() stops the clients.
    let turn = Arc::new(AtomicUsize::new(0));
    let workers: Vec<_> = (0..threads)
        .map(|_| {
            let (done, failed, turn, addrs) = (done.clone(), failed.clone(), turn.clone(), addrs.to_vec());
            std::thread::spawn(move || loop {
                let current = turn.load(Ordering::Relaxed);
                let Some(addr) = addrs.get(current) else { return };
                let counter = if one_exchange(*addr).is_ok() { &done } else { &failed };
                // An exchange that straddled a turn counts for the address it used.
                counter[current].fetch_add(1, Ordering::Relaxed);
            })
        })
        .collect();
    let mut elapsed = vec![Duration::ZERO; addrs.len()];
    let total = Duration::from_secs(seconds);
    while elapsed[addrs.len() - 1] < total {
        for (current, elapsed) in elapsed.iter_mut().enumerate() {
            turn.store(current, Ordering::Relaxed);
            let started = Instant::now();
            std::thread::sleep(RATE_TURN.min(total - *elapsed));
            *elapsed += started.elapsed();
        }
    }
    turn.store(addrs.len(), Ordering::Relaxed);
    for worker in workers {
        worker.join().unwrap();
    }
    for ((done, failed), elapsed) in done.iter().zip(failed.iter()).zip(elapsed) {
        println!("{:.0} {}", done.load(Ordering::Relaxed) as f64 / elapsed.as_secs_f64(), failed.load(Ordering::Relaxed));
    }
}

fn one_exchange(addr: SocketAddr) -> std::io::Result<()> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.write_all(&[ANSWER_AND_CLOSE])?;
    let mut answer = [0u8; 2];
    match stream.read(&mut answer)? {
        1 if stream.read(&mut answer[1..])? == 0 => Ok(()),
        _ => Err(std::io::ErrorKind::InvalidData.into()),
    }
}
