//! Dials each address read from standard input (one socket address a line: `10.0.0.1:80`,
//! `[fd00::1]:80`), sends `GET /` over HTTP/1.0 and prints, one line each and in the input's
//! order, the answer's body, or `error: ...`. Tests run it inside a pod as an ordinary user to see
//! where a capture sends that user's connections: the body says which server answered.
//!
//! Dials run 16 at a time, each given 3 s to connect (time for one retransmitted SYN: a SYN can be
//! lost to a TIME_WAIT socket of an earlier probe's 4-tuple, and TCP resends it after 1 s; a
//! capture that black-holes a connection still fails it) and 2 s to answer.
//!
//! Usage: http-probe < ADDRESSES

use std::io::{BufRead, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

const PARALLEL: usize = 16;

fn main() {
    let addresses: Vec<SocketAddr> = std::io::stdin()
        .lock()
        .lines()
        .map(|line| line.expect("read standard input"))
        .filter(|line| !line.trim().is_empty())
        .map(|line| line.trim().parse().unwrap_or_else(|e| panic!("not a socket address: {line:?}: {e}")))
        .collect();
    let answers = Mutex::new(vec![String::new(); addresses.len()]);
    let next = AtomicUsize::new(0);
    std::thread::scope(|scope| {
        for _ in 0..PARALLEL.min(addresses.len()) {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(&addr) = addresses.get(i) else { return };
                let answer = get(addr).unwrap_or_else(|e| format!("error: {e}"));
                answers.lock().unwrap()[i] = answer.replace('\n', " ");
            });
        }
    });
    let mut out = std::io::stdout().lock();
    for answer in answers.into_inner().unwrap() {
        writeln!(out, "{answer}").expect("write standard output");
    }
}

/// The body `GET /` on `addr` answers.
fn get(addr: SocketAddr) -> std::io::Result<String> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    stream.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    Ok(response.split_once("\r\n\r\n").map(|(_, body)| body.to_string()).unwrap_or(response))
}
