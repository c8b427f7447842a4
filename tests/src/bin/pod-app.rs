//! The application of the end-to-end pod (tests/tests/injector.rs): a small HTTP/1.0 server run
//! in a container of the pod. `GET /` answers `app saw PEER`; `GET /call/ADDR` first calls
//! `GET /` on ADDR (an outbound connection from the pod) and adds that answer.
//!
//! Usage: pod-app PORT

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

fn main() {
    let port: u16 = std::env::args().nth(1).and_then(|p| p.parse().ok()).expect("usage: pod-app PORT");
    let listener = TcpListener::bind(("0.0.0.0", port)).expect("bind");
    eprintln!("pod-app listening on {port}");
    for stream in listener.incoming().flatten() {
        std::thread::spawn(move || {
            if let Err(e) = serve(stream) {
                eprintln!("pod-app: {e}");
            }
        });
    }
}

fn serve(mut stream: TcpStream) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let peer = stream.peer_addr()?;
    // The whole head, up to its blank line: closing with unread bytes would reset the connection.
    let mut head = BufReader::new(&stream).lines();
    let request_line = head.next().transpose()?.unwrap_or_default();
    for line in head {
        if line?.is_empty() {
            break;
        }
    }
    let path = request_line.split_whitespace().nth(1).unwrap_or("/").to_string();
    let mut body = format!("app saw {}", peer.ip());
    if let Some(upstream) = path.strip_prefix("/call/") {
        body += &format!("; {upstream} said: {}", call(upstream)?);
    }
    write!(stream, "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{body}", body.len())
}

/// The body `GET /` on `addr` answers.
fn call(addr: &str) -> std::io::Result<String> {
    let mut upstream = TcpStream::connect(addr)?;
    upstream.set_read_timeout(Some(Duration::from_secs(10)))?;
    upstream.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
    let mut response = String::new();
    upstream.read_to_string(&mut response)?;
    Ok(response.split_once("\r\n\r\n").map(|(_, body)| body.to_string()).unwrap_or(response))
}
