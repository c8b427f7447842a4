//! capture-proxy end to end, on the real kernel: a client namespace, a pod namespace holding
//! OUR istio-iptables rules, capture-proxy (uid 1337) and an application, and an external
//! namespace with a server, joined by veth pairs.
//!
//! ```text
//! client 10.44.1.1 ── eth0 10.44.1.2 [pod: rules, proxy, app :8080] eth1 10.44.2.2 ── external 10.44.2.1 :9090
//!        fd00:44:1::1     fd00:44:1::2                                fd00:44:2::2        fd00:44:2::1
//! ```
//!
//! The tests run the release binaries: `cargo build --release` first (scripts/test.sh does).

use std::io::{self, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use capture_tests::{http_get, link, metric, release_bin, require_netns, run_ok, Pod, ProxyProcess};

const APP_PORT: u16 = 8080;
const EXTERNAL_PORT: u16 = 9090;
/// Enough to cross many socket buffers and pipe refills in each direction.
const BULK: usize = 24 << 20;

#[derive(Clone, Copy, PartialEq)]
enum Family {
    V4,
    V6,
}

struct Addrs {
    client: IpAddr,
    pod: IpAddr,
    pod_external_side: IpAddr,
    external: IpAddr,
}

impl Family {
    fn addrs(self) -> Addrs {
        let ip = |s: &str| s.parse().unwrap();
        match self {
            Family::V4 => Addrs {
                client: ip("10.44.1.1"),
                pod: ip("10.44.1.2"),
                pod_external_side: ip("10.44.2.2"),
                external: ip("10.44.2.1"),
            },
            Family::V6 => Addrs {
                client: ip("fd00:44:1::1"),
                pod: ip("fd00:44:1::2"),
                pod_external_side: ip("fd00:44:2::2"),
                external: ip("fd00:44:2::1"),
            },
        }
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Redirect,
    Tproxy,
}

#[derive(Clone, Copy, PartialEq)]
enum Backend {
    Iptables,
    Nftables,
}

/// The three namespaces, with capture rules and a running proxy in the pod.
struct Mesh {
    proxy: ProxyProcess,
    client: Pod,
    pod: Pod,
    external: Pod,
}

impl Mesh {
    fn new(mode: Mode, backend: Backend, proxy_flags: &[&str]) -> Mesh {
        let (client, pod, external) = (Pod::new(), Pod::new(), Pod::new());
        link(&client, "eth0", "10.44.1.1/24", &pod, "eth0", "10.44.1.2/24");
        link(&pod, "eth1", "10.44.2.2/24", &external, "eth0", "10.44.2.1/24");
        client.sh("ip addr add fd00:44:1::1/64 dev eth0 nodad");
        pod.sh("ip addr add fd00:44:1::2/64 dev eth0 nodad && ip addr add fd00:44:2::2/64 dev eth1 nodad");
        external.sh("ip addr add fd00:44:2::1/64 dev eth0 nodad");

        let mut capture = pod.cmd(release_bin("istio-iptables"));
        capture.args(["-p", "15001", "-z", "15006", "-u", "1337", "-m"]);
        capture.arg(if mode == Mode::Tproxy { "TPROXY" } else { "REDIRECT" });
        capture.args(["-i", "*", "-x", "", "-b", "*", "-d", "15090,15021,15020", "--dual-stack"]);
        if backend == Backend::Nftables {
            capture.arg("--native-nftables");
        }
        run_ok(&mut capture);

        let mut flags = proxy_flags.to_vec();
        if mode == Mode::Tproxy {
            flags.extend(["--inbound-mode", "TPROXY"]);
        }
        let log = std::env::temp_dir().join(format!("{}-capture-proxy.log", pod.name));
        let proxy = ProxyProcess::spawn(&mut proxy_command(&pod, mode == Mode::Tproxy, &flags), log);
        let mesh = Mesh { proxy, client, pod, external };
        mesh.wait_ready();
        mesh
    }

    fn wait_ready(&self) {
        self.pod.wait_proxy_ready(|| self.log_text());
    }

    fn log_text(&self) -> String {
        self.proxy.log_text()
    }

    fn metrics(&self) -> String {
        self.pod.proxy_metrics()
    }

    fn expect_metric(&self, series: &str, want: u64) {
        self.pod.expect_proxy_metric(series, want);
    }

    fn wait_exit(&mut self) -> std::process::ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.proxy.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "the proxy did not exit after SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// capture-proxy in `pod` as uid 1337, the way a sidecar container runs it.
fn proxy_command(pod: &Pod, net_admin: bool, flags: &[&str]) -> Command {
    let mut cmd = pod.cmd("setpriv");
    cmd.args(["--reuid=1337", "--regid=1337", "--clear-groups"]);
    if net_admin {
        cmd.args(["--inh-caps=+net_admin", "--ambient-caps=+net_admin"]);
    }
    cmd.arg(release_bin("capture-proxy")).args(flags).env("RUST_LOG", "capture_proxy=debug");
    cmd
}

/// FNV-1a over a byte stream, with its length: what both ends compare.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Digest {
    len: u64,
    hash: u64,
}

impl Digest {
    fn new() -> Digest {
        Digest { len: 0, hash: 0xcbf2_9ce4_8422_2325 }
    }

    fn update(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.hash = (self.hash ^ b as u64).wrapping_mul(0x0100_0000_01b3);
        }
        self.len += bytes.len() as u64;
    }
}

/// Writes `len` pseudo-random bytes (from `seed`) and returns their digest.
fn send_pattern(stream: &mut TcpStream, len: usize, seed: u64) -> io::Result<Digest> {
    for_each_pattern_block(len, seed, |block| stream.write_all(block))
}

/// The digest of the bytes `send_pattern` writes.
fn pattern_digest(len: usize, seed: u64) -> Digest {
    for_each_pattern_block(len, seed, |_| Ok(())).unwrap()
}

fn for_each_pattern_block(len: usize, seed: u64, mut f: impl FnMut(&[u8]) -> io::Result<()>) -> io::Result<Digest> {
    let mut state = seed | 1;
    let mut digest = Digest::new();
    let mut block = vec![0u8; 64 * 1024];
    let mut left = len;
    while left > 0 {
        let n = left.min(block.len());
        for word in block[..n].chunks_mut(8) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            word.copy_from_slice(&state.to_le_bytes()[..word.len()]);
        }
        f(&block[..n])?;
        digest.update(&block[..n]);
        left -= n;
    }
    Ok(digest)
}

/// Reads to EOF; the digest of what arrived, or how the read failed.
fn receive_all(stream: &mut TcpStream) -> Result<Digest, io::ErrorKind> {
    let mut digest = Digest::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return Ok(digest),
            Ok(n) => digest.update(&buf[..n]),
            Err(e) => return Err(e.kind()),
        }
    }
}

/// What a test server saw of one connection.
#[derive(Debug)]
struct Seen {
    peer: SocketAddr,
    received: Result<Digest, io::ErrorKind>,
}

/// A server listening in `ns` on `port` (both families): per connection it runs `behave`, and
/// reports what it saw on the returned channel.
fn server(ns: &Pod, port: u16, behave: fn(&mut TcpStream) -> Result<Digest, io::ErrorKind>) -> mpsc::Receiver<Seen> {
    let (tx, rx) = mpsc::channel();
    for any in [IpAddr::from([0u8; 4]), IpAddr::from([0u16; 8])] {
        let listener = ns.enter(|| bind_only(SocketAddr::new(any, port)));
        let tx = tx.clone();
        std::thread::spawn(move || {
            for mut stream in listener.incoming().flatten() {
                let tx = tx.clone();
                std::thread::spawn(move || {
                    set_timeouts(&stream);
                    let peer = stream.peer_addr().unwrap();
                    let received = behave(&mut stream);
                    let _ = tx.send(Seen { peer, received });
                });
            }
        });
    }
    rx
}

/// A listener on exactly `addr` (IPv6 sockets IPv6-only, so the two families can share a port).
fn bind_only(addr: SocketAddr) -> TcpListener {
    let socket = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::STREAM, None).unwrap();
    if addr.is_ipv6() {
        socket.set_only_v6(true).unwrap();
    }
    socket.set_reuse_address(true).unwrap();
    socket.bind(&addr.into()).unwrap();
    socket.listen(128).unwrap();
    socket.into()
}

/// Reads the request to EOF, then answers with BULK bytes: the request's FIN must get through
/// while the answer still flows the other way.
fn answer_after_eof(stream: &mut TcpStream) -> Result<Digest, io::ErrorKind> {
    let received = receive_all(stream)?;
    send_pattern(stream, BULK, 2).map_err(|e| e.kind())?;
    Ok(received)
}

/// Sends BULK bytes and, concurrently, reads the whole answer: checks both arrived intact.
fn bulk_exchange(mut stream: TcpStream, server: &mpsc::Receiver<Seen>) -> Seen {
    let mut writer = stream.try_clone().unwrap();
    let sending = std::thread::spawn(move || {
        let sent = send_pattern(&mut writer, BULK, 1).unwrap();
        writer.shutdown(Shutdown::Write).unwrap();
        sent
    });
    let answer = receive_all(&mut stream);
    assert!(answer.is_ok(), "{answer:?}: {:?}", server.try_recv());
    let answer = answer.unwrap();
    let sent = sending.join().unwrap();
    assert_eq!(answer, pattern_digest(BULK, 2), "the answer arrived changed");
    let seen = server.recv_timeout(Duration::from_secs(10)).expect("the server saw the connection");
    assert_eq!(seen.received, Ok(sent), "the request arrived changed");
    seen
}

/// A connection made from inside `ns`; reads and writes give up after 10 s instead of hanging.
fn connect(ns: &Pod, addr: SocketAddr) -> TcpStream {
    let stream = ns
        .enter(|| TcpStream::connect_timeout(&addr, Duration::from_secs(5)))
        .unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
    set_timeouts(&stream);
    stream
}

fn set_timeouts(stream: &TcpStream) {
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    stream.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
}

/// A mesh with `mode`, `backend` and proxy `flags`, checked with bulk transfers in `family`.
fn bulk_test(mode: Mode, backend: Backend, flags: &[&str], family: Family) {
    require_netns!();
    let mesh = Mesh::new(mode, backend, flags);
    bulk_both_ways(&mesh, family, mode);
}

/// Inbound and outbound bulk transfers in one family and mode, with exact accounting.
fn bulk_both_ways(mesh: &Mesh, family: Family, mode: Mode) {
    let addrs = family.addrs();
    let app = server(&mesh.pod, APP_PORT, answer_after_eof);
    let external = server(&mesh.external, EXTERNAL_PORT, answer_after_eof);

    let seen = bulk_exchange(connect(&mesh.client, SocketAddr::new(addrs.pod, APP_PORT)), &app);
    let expected_source = match (mode, family) {
        (Mode::Tproxy, _) => addrs.client,
        (Mode::Redirect, Family::V4) => "127.0.0.6".parse().unwrap(),
        (Mode::Redirect, Family::V6) => "::6".parse().unwrap(),
    };
    assert_eq!(seen.peer.ip(), expected_source, "the address the application sees");

    let seen = bulk_exchange(connect(&mesh.pod, SocketAddr::new(addrs.external, EXTERNAL_PORT)), &external);
    assert_eq!(seen.peer.ip(), addrs.pod_external_side, "the external server sees the pod");

    for direction in ["inbound", "outbound"] {
        mesh.expect_metric(&format!(r#"capture_proxy_connections_active{{direction="{direction}"}}"#), 0);
        let text = mesh.metrics();
        let get = |series: String| metric(&text, &series);
        assert_eq!(
            get(format!(r#"capture_proxy_connections_total{{direction="{direction}"}}"#)),
            1,
            "each connection counted once\n{text}"
        );
        assert_eq!(get(format!(r#"capture_proxy_bytes_total{{direction="{direction}",flow="upstream"}}"#)), BULK as u64);
        assert_eq!(get(format!(r#"capture_proxy_bytes_total{{direction="{direction}",flow="downstream"}}"#)), BULK as u64);
        assert_eq!(get(format!(r#"capture_proxy_connect_duration_seconds_count{{direction="{direction}"}}"#)), 1);
        assert_eq!(get(format!(r#"capture_proxy_connect_errors_total{{direction="{direction}"}}"#)), 0);
    }
    let log = mesh.log_text();
    assert!(log.contains("connection closed") && log.contains(&format!("dst={}", SocketAddr::new(addrs.pod, APP_PORT))), "{log}");
}

#[test]
#[cfg_attr(netns_unavailable, ignore = "needs root and network namespaces")]
fn redirect_ipv4_carries_bulk_data_both_ways() {
    bulk_test(Mode::Redirect, Backend::Iptables, &[], Family::V4);
}

#[test]
#[cfg_attr(netns_unavailable, ignore = "needs root and network namespaces")]
fn redirect_ipv6_carries_bulk_data_both_ways() {
    bulk_test(Mode::Redirect, Backend::Iptables, &[], Family::V6);
}

#[test]
#[cfg_attr(netns_unavailable, ignore = "needs root and network namespaces")]
fn tproxy_ipv4_app_sees_the_client() {
    bulk_test(Mode::Tproxy, Backend::Iptables, &[], Family::V4);
}

#[test]
#[cfg_attr(netns_unavailable, ignore = "needs root and network namespaces")]
fn tproxy_ipv6_app_sees_the_client() {
    bulk_test(Mode::Tproxy, Backend::Iptables, &[], Family::V6);
}

#[test]
#[cfg_attr(netns_unavailable, ignore = "needs root and network namespaces")]
fn nftables_backend_redirect() {
    bulk_test(Mode::Redirect, Backend::Nftables, &[], Family::V4);
}

#[test]
#[cfg_attr(netns_unavailable, ignore = "needs root and network namespaces")]
fn nftables_backend_tproxy_ipv6() {
    bulk_test(Mode::Tproxy, Backend::Nftables, &[], Family::V6);
}

#[test]
#[cfg_attr(netns_unavailable, ignore = "needs root and network namespaces")]
fn userspace_copy_relay_keeps_data_intact() {
    bulk_test(Mode::Redirect, Backend::Iptables, &["--relay", "copy"], Family::V4);
}

/// Sends one line and reads the answer to EOF.
fn request(stream: &mut TcpStream) -> String {
    stream.write_all(b"ping\n").unwrap();
    stream.shutdown(Shutdown::Write).unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    answer
}

/// Reads one line, answers with the peer's address (without waiting for EOF: bash's /dev/tcp
/// cannot half-close).
fn echo_peer(stream: &mut TcpStream) -> Result<Digest, io::ErrorKind> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while !line.ends_with(b"\n") {
        match stream.read(&mut byte) {
            Ok(0) => break,
            Ok(_) => line.push(byte[0]),
            Err(e) => return Err(e.kind()),
        }
    }
    let peer = stream.peer_addr().unwrap();
    stream.write_all(peer.to_string().as_bytes()).map_err(|e| e.kind())?;
    let mut digest = Digest::new();
    digest.update(&line);
    Ok(digest)
}

#[test]
#[cfg_attr(netns_unavailable, ignore = "needs root and network namespaces")]
fn proxy_uid_and_pod_local_traffic_are_not_captured() {
    require_netns!();
    let mesh = Mesh::new(Mode::Redirect, Backend::Iptables, &[]);
    let app = server(&mesh.pod, APP_PORT, echo_peer);
    let external = server(&mesh.external, EXTERNAL_PORT, echo_peer);

    // uid 1337 reaches the external server directly (bash's /dev/tcp as the proxy's user).
    let out = run_ok(
        mesh.pod
            .cmd("setpriv")
            .args(["--reuid=1337", "--regid=1337", "--clear-groups", "bash", "-c"])
            .arg(format!("exec 3<>/dev/tcp/10.44.2.1/{EXTERNAL_PORT}; echo hi >&3; cat <&3")),
    );
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("10.44.2.2:"), "{out:?}");
    external.recv_timeout(Duration::from_secs(5)).unwrap();

    // The application talking to itself over 127.0.0.1 stays on loopback.
    let answer = request(&mut connect(&mesh.pod, SocketAddr::from(([127, 0, 0, 1], APP_PORT))));
    assert!(answer.starts_with("127.0.0.1:"), "{answer}");
    app.recv_timeout(Duration::from_secs(5)).unwrap();

    let text = mesh.metrics();
    for direction in ["inbound", "outbound"] {
        assert_eq!(metric(&text, &format!(r#"capture_proxy_connections_total{{direction="{direction}"}}"#)), 0, "{text}");
    }
}

#[test]
#[cfg_attr(netns_unavailable, ignore = "needs root and network namespaces")]
fn admin_ports_are_reachable_from_outside_without_the_proxy() {
    require_netns!();
    let mesh = Mesh::new(Mode::Redirect, Backend::Iptables, &[]);
    for pod_ip in [Family::V4.addrs().pod, Family::V6.addrs().pod] {
        let ready = mesh.client.enter(|| http_get(SocketAddr::new(pod_ip, 15021), "/healthz/ready")).unwrap();
        assert_eq!(ready, ("200".to_string(), "ready\n".to_string()));
        let (status, body) = mesh.client.enter(|| http_get(SocketAddr::new(pod_ip, 15090), "/stats/prometheus")).unwrap();
        assert_eq!(status, "200");
        assert!(body.contains("# TYPE capture_proxy_connect_duration_seconds histogram"), "{body}");
    }
    let text = mesh.metrics();
    assert_eq!(
        metric(&text, r#"capture_proxy_connections_total{direction="inbound"}"#),
        0,
        "admin traffic went through the proxy\n{text}"
    );
}

fn greet_then_read(stream: &mut TcpStream) -> Result<Digest, io::ErrorKind> {
    stream.write_all(b"hello").map_err(|e| e.kind())?;
    stream.shutdown(Shutdown::Write).map_err(|e| e.kind())?;
    receive_all(stream)
}

#[test]
#[cfg_attr(netns_unavailable, ignore = "needs root and network namespaces")]
fn half_close_passes_each_fin_on_by_itself() {
    require_netns!();
    let mesh = Mesh::new(Mode::Redirect, Backend::Iptables, &[]);
    // The client's FIN first: the application answers after it (and after a pause).
    let app = server(&mesh.pod, APP_PORT, |stream| {
        let received = receive_all(stream)?;
        std::thread::sleep(Duration::from_millis(200));
        stream.write_all(b"late answer").map_err(|e| e.kind())?;
        Ok(received)
    });
    let answer = request(&mut connect(&mesh.client, SocketAddr::new(Family::V4.addrs().pod, APP_PORT)));
    assert_eq!(answer, "late answer");
    assert_eq!(app.recv_timeout(Duration::from_secs(5)).unwrap().received.map(|d| d.len), Ok(5));

    // The server's FIN first: the client reads EOF and may still send afterwards.
    let external = server(&mesh.external, EXTERNAL_PORT, greet_then_read);
    let mut stream = connect(&mesh.pod, SocketAddr::new(Family::V4.addrs().external, EXTERNAL_PORT));
    let mut greeting = String::new();
    stream.read_to_string(&mut greeting).unwrap();
    assert_eq!(greeting, "hello");
    std::thread::sleep(Duration::from_millis(200));
    let sent = send_pattern(&mut stream, 1 << 20, 7).unwrap();
    stream.shutdown(Shutdown::Write).unwrap();
    assert_eq!(external.recv_timeout(Duration::from_secs(5)).unwrap().received, Ok(sent));
}

/// Makes closing `stream` send RST (SO_LINGER 0).
fn reset_on_close(stream: &TcpStream) {
    socket2::SockRef::from(stream).set_linger(Some(Duration::ZERO)).unwrap();
}

#[test]
#[cfg_attr(netns_unavailable, ignore = "needs root and network namespaces")]
fn resets_propagate_both_ways() {
    require_netns!();
    let mesh = Mesh::new(Mode::Redirect, Backend::Iptables, &[]);
    let pod_app = SocketAddr::new(Family::V4.addrs().pod, APP_PORT);

    // The client resets: the application's read fails instead of seeing a clean end.
    let app = server(&mesh.pod, APP_PORT, receive_all);
    let mut stream = connect(&mesh.client, pod_app);
    stream.write_all(b"partial request").unwrap();
    std::thread::sleep(Duration::from_millis(100));
    reset_on_close(&stream);
    drop(stream);
    let seen = app.recv_timeout(Duration::from_secs(5)).unwrap();
    assert_eq!(seen.received, Err(io::ErrorKind::ConnectionReset));

    // The external server resets: the application's read fails too.
    let external = server(&mesh.external, EXTERNAL_PORT, |stream| {
        let mut first = [0u8; 4];
        stream.read_exact(&mut first).map_err(|e| e.kind())?;
        reset_on_close(stream);
        Ok(Digest::new())
    });
    let mut stream = connect(&mesh.pod, SocketAddr::new(Family::V4.addrs().external, EXTERNAL_PORT));
    stream.write_all(b"ping").unwrap();
    external.recv_timeout(Duration::from_secs(5)).unwrap();
    assert_eq!(receive_all(&mut stream), Err(io::ErrorKind::ConnectionReset));

    // A client that resets after its FIN, while the application is still silent: the reset
    // reaches the application at once, so its late answer fails instead of vanishing.
    let app = server(&mesh.pod, APP_PORT + 1, |stream| {
        let received = receive_all(stream)?;
        std::thread::sleep(Duration::from_millis(500));
        stream.write_all(b"late answer").map_err(|e| e.kind())?;
        Ok(received)
    });
    let mut stream = connect(&mesh.client, SocketAddr::new(Family::V4.addrs().pod, APP_PORT + 1));
    stream.write_all(b"request").unwrap();
    stream.shutdown(Shutdown::Write).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    reset_on_close(&stream);
    drop(stream);
    let late_answer = app.recv_timeout(Duration::from_secs(5)).unwrap().received;
    assert!(matches!(late_answer, Err(io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset)), "{late_answer:?}");
}

/// Connects from `ns` to `addr` and expects the proxy to reset the connection, which may
/// arrive before the connect call has even returned.
fn expect_reset(ns: &Pod, addr: SocketAddr) {
    let outcome =
        ns.enter(|| TcpStream::connect_timeout(&addr, Duration::from_secs(5))).map_err(|e| e.kind()).and_then(|mut stream| {
            set_timeouts(&stream);
            receive_all(&mut stream)
        });
    assert_eq!(outcome, Err(io::ErrorKind::ConnectionReset), "connection to {addr}");
}

#[test]
#[cfg_attr(netns_unavailable, ignore = "needs root and network namespaces")]
fn loops_back_into_the_proxy_are_refused() {
    require_netns!();
    let mesh = Mesh::new(Mode::Redirect, Backend::Iptables, &[]);
    let addrs = Family::V4.addrs();
    // Outbound: the application dials the proxy's outbound port on its own address.
    expect_reset(&mesh.pod, SocketAddr::new(addrs.pod, 15001));
    // Inbound: a client dials the inbound capture port.
    expect_reset(&mesh.client, SocketAddr::new(addrs.pod, 15006));

    mesh.expect_metric(r#"capture_proxy_connections_refused_total{direction="outbound",reason="loop"}"#, 1);
    mesh.expect_metric(r#"capture_proxy_connections_refused_total{direction="inbound",reason="loop"}"#, 1);
    let text = mesh.metrics();
    for direction in ["inbound", "outbound"] {
        assert_eq!(
            metric(&text, &format!(r#"capture_proxy_connections_total{{direction="{direction}"}}"#)),
            1,
            "no second trip\n{text}"
        );
        assert_eq!(
            metric(&text, &format!(r#"capture_proxy_connect_duration_seconds_count{{direction="{direction}"}}"#)),
            0,
            "{text}"
        );
    }
}

#[test]
#[cfg_attr(netns_unavailable, ignore = "needs root and network namespaces")]
fn unreachable_destinations_reset_the_client_and_count() {
    require_netns!();
    let mesh = Mesh::new(Mode::Redirect, Backend::Iptables, &[]);
    // Nothing listens on the external server's port 9: it answers the proxy's SYN with RST.
    expect_reset(&mesh.pod, SocketAddr::new(Family::V4.addrs().external, 9));
    mesh.expect_metric(r#"capture_proxy_connect_errors_total{direction="outbound"}"#, 1);
    assert!(mesh.log_text().contains("connect to 10.44.2.1:9 failed"), "{}", mesh.log_text());
}

#[test]
#[cfg_attr(netns_unavailable, ignore = "needs root and network namespaces")]
fn connections_over_the_limit_are_refused_and_idle_ones_time_out() {
    require_netns!();
    let mesh = Mesh::new(Mode::Redirect, Backend::Iptables, &["--max-connections", "1", "--idle-timeout", "1s"]);
    let external = server(&mesh.external, EXTERNAL_PORT, receive_all);
    let external_addr = SocketAddr::new(Family::V4.addrs().external, EXTERNAL_PORT);

    let mut first = connect(&mesh.pod, external_addr);
    first.write_all(b"holding the only slot").unwrap();
    let last_activity = Instant::now();
    expect_reset(&mesh.pod, external_addr);
    mesh.expect_metric(r#"capture_proxy_connections_refused_total{direction="outbound",reason="limit"}"#, 1);

    // Silence for the idle timeout closes the first connection at both ends.
    first.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert_eq!(receive_all(&mut first).map(|d| d.len), Ok(0));
    let waited = last_activity.elapsed();
    assert!(waited >= Duration::from_millis(900) && waited < Duration::from_secs(3), "closed after {waited:?}");
    let seen = external.recv_timeout(Duration::from_secs(5)).unwrap();
    assert_eq!(seen.received.map(|d| d.len), Ok(21));
    mesh.expect_metric(r#"capture_proxy_connections_active{direction="outbound"}"#, 0);
}

/// An application that answers "done" after the end of each request, and a connection to it
/// through the proxy that has sent the first half of its 23-byte request.
fn connection_in_flight(mesh: &Mesh) -> (mpsc::Receiver<Seen>, SocketAddr, TcpStream) {
    let app = server(&mesh.pod, APP_PORT, |stream| {
        let received = receive_all(stream)?;
        stream.write_all(b"done").map_err(|e| e.kind())?;
        Ok(received)
    });
    let pod_app = SocketAddr::new(Family::V4.addrs().pod, APP_PORT);
    let mut in_flight = connect(&mesh.client, pod_app);
    in_flight.write_all(b"first half, ").unwrap();
    mesh.expect_metric(r#"capture_proxy_connections_active{direction="inbound"}"#, 1);
    (app, pod_app, in_flight)
}

/// Sends the second half of the request, ends it, and returns the answer.
fn finish_request(in_flight: &mut TcpStream) -> String {
    in_flight.write_all(b"second half").unwrap();
    in_flight.shutdown(Shutdown::Write).unwrap();
    let mut answer = String::new();
    in_flight.read_to_string(&mut answer).unwrap();
    answer
}

#[test]
#[cfg_attr(netns_unavailable, ignore = "needs root and network namespaces")]
fn sigterm_stops_accepting_and_drains_in_flight_connections() {
    require_netns!();
    let mut mesh = Mesh::new(Mode::Redirect, Backend::Iptables, &["--drain-timeout", "5s"]);
    let (app, pod_app, mut in_flight) = connection_in_flight(&mesh);

    run_ok(Command::new("kill").args(["-TERM", &mesh.proxy.id().to_string()]));
    // New connections are no longer accepted (the rules still send them to the closed port).
    let deadline = Instant::now() + Duration::from_secs(5);
    while mesh.client.enter(|| TcpStream::connect_timeout(&pod_app, Duration::from_secs(1))).is_ok() {
        assert!(Instant::now() < deadline, "still accepting after SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    }
    let ready = mesh.pod.enter(|| http_get(SocketAddr::from(([127, 0, 0, 1], 15021)), "/healthz/ready"));
    assert!(ready.is_err() || ready.unwrap().0 == "503", "not ready while draining");
    assert!(mesh.proxy.try_wait().unwrap().is_none(), "exited with a connection in flight");

    // The connection in flight still completes, and then the proxy exits cleanly.
    assert_eq!(finish_request(&mut in_flight), "done");
    // A probe above may have been accepted just before the listener closed: the app then saw
    // it too, empty; the connection in flight is the one that carried 23 bytes.
    let carried = std::iter::from_fn(|| app.recv_timeout(Duration::from_secs(5)).ok())
        .map(|seen| seen.received.map(|d| d.len))
        .find(|received| *received != Ok(0));
    assert_eq!(carried, Some(Ok(23)));
    assert!(mesh.wait_exit().success(), "{}", mesh.log_text());
    assert!(mesh.log_text().contains("drained"), "{}", mesh.log_text());
}

/// Starts capture-proxy in a fresh namespace with `flags` and returns its exit code and
/// stderr; a proxy still running after 5 s fails the test (it accepted what it should refuse).
fn start_expecting_exit(flags: &[&str]) -> (Option<i32>, String) {
    let pod = Pod::new();
    let log = std::env::temp_dir().join(format!("{}-capture-proxy.log", pod.name));
    let mut proxy = ProxyProcess::spawn(pod.cmd(release_bin("capture-proxy")).arg("--allow-any-uid").args(flags), log);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(status) = proxy.try_wait().unwrap() {
            return (status.code(), proxy.log_text());
        }
        assert!(Instant::now() < deadline, "{flags:?} was accepted: the proxy is running\n{}", proxy.log_text());
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
#[cfg_attr(netns_unavailable, ignore = "needs root and network namespaces")]
fn zero_overflowing_and_non_go_durations_are_refused_at_start_up() {
    require_netns!();
    for (flag, value) in [
        ("--idle-timeout", "0s"),
        ("--connect-timeout", "0"),
        ("--idle-timeout", "9999999999999999999s"),
        ("--drain-timeout", "99999999999999999h"),
        ("--idle-timeout", "7"),
    ] {
        let (code, stderr) = start_expecting_exit(&[flag, value]);
        assert_eq!(code, Some(2), "{flag} {value}: {stderr}");
        assert!(stderr.contains(flag) && stderr.contains(value), "{flag} {value}: {stderr}");
    }
}

#[test]
#[cfg_attr(netns_unavailable, ignore = "needs root and network namespaces")]
fn the_longest_go_duration_is_an_idle_timeout_that_never_fires() {
    require_netns!();
    let mesh = Mesh::new(Mode::Redirect, Backend::Iptables, &["--idle-timeout", "2562047h47m16.854775807s"]);
    let app = server(&mesh.pod, APP_PORT, echo_peer);
    let answer = request(&mut connect(&mesh.client, SocketAddr::new(Family::V4.addrs().pod, APP_PORT)));
    assert!(answer.starts_with("127.0.0.6:"), "{answer}\n{}", mesh.log_text());
    app.recv_timeout(Duration::from_secs(5)).unwrap();
    mesh.expect_metric(r#"capture_proxy_connections_active{direction="inbound"}"#, 0);
    assert!(!mesh.log_text().contains("panicked"), "{}", mesh.log_text());
}

#[test]
#[cfg_attr(netns_unavailable, ignore = "needs root and network namespaces")]
fn sighup_and_sigusr_are_logged_and_ignored_with_connections_in_flight() {
    require_netns!();
    let mesh = Mesh::new(Mode::Redirect, Backend::Iptables, &[]);
    let (app, pod_app, mut in_flight) = connection_in_flight(&mesh);

    for signal in ["HUP", "USR1", "USR2"] {
        run_ok(Command::new("kill").args([&format!("-{signal}"), &mesh.proxy.id().to_string()]));
    }
    std::thread::sleep(Duration::from_millis(200));
    assert!(mesh.proxy.alive(), "a signal stopped the proxy:\n{}", mesh.log_text());
    mesh.wait_ready();
    // The connection in flight completes, and new ones are still relayed.
    assert_eq!(finish_request(&mut in_flight), "done");
    assert_eq!(app.recv_timeout(Duration::from_secs(5)).unwrap().received.map(|d| d.len), Ok(23));
    assert_eq!(request(&mut connect(&mesh.client, pod_app)), "done");
    let log = mesh.log_text();
    for signal in ["SIGHUP", "SIGUSR1", "SIGUSR2"] {
        assert!(log.contains(&format!("signal=\"{signal}\"")) || log.contains(&format!("signal={signal}")), "{log}");
    }
    assert!(!log.contains("draining"), "{log}");
}

#[test]
#[cfg_attr(netns_unavailable, ignore = "needs root and network namespaces")]
fn refuses_to_run_where_its_own_traffic_would_loop_or_tproxy_cannot_work() {
    require_netns!();
    let pod = Pod::new();
    // As root: the capture rules exempt only uid 1337, so its upstream connections would loop.
    let out = pod.cmd(release_bin("capture-proxy")).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("running as uid 0") && stderr.contains("--allow-any-uid"), "{stderr}");

    // TPROXY as uid 1337 without CAP_NET_ADMIN: the missing capability is named.
    let out = pod
        .cmd("setpriv")
        .args(["--reuid=1337", "--regid=1337", "--clear-groups"])
        .arg(release_bin("capture-proxy"))
        .args(["--inbound-mode", "TPROXY"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("CAP_NET_ADMIN"), "{stderr}");

    // The mode also comes from Istio's environment variable.
    let out = pod
        .cmd("setpriv")
        .args(["--reuid=1337", "--regid=1337", "--clear-groups"])
        .arg(release_bin("capture-proxy"))
        .env("INBOUND_INTERCEPTION_MODE", "TPROXY")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("CAP_NET_ADMIN"), "{out:?}");
}

/// The capability sets of every thread of process `pid`: (CapEff, CapPrm, CapInh, CapAmb).
fn thread_capabilities(pid: u32) -> Vec<[String; 4]> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).unwrap();
    tasks
        .map(|task| {
            let status = std::fs::read_to_string(task.unwrap().path().join("status")).unwrap();
            let set = |name: &str| status.lines().find_map(|l| l.strip_prefix(name)).unwrap().trim().to_string();
            [set("CapEff:"), set("CapPrm:"), set("CapInh:"), set("CapAmb:")]
        })
        .collect()
}

#[test]
#[cfg_attr(netns_unavailable, ignore = "needs root and network namespaces")]
fn every_thread_keeps_only_the_capabilities_its_mode_needs() {
    require_netns!();
    const NONE: &str = "0000000000000000";
    const NET_ADMIN: &str = "0000000000001000";
    for (mode, kept) in [(Mode::Redirect, NONE), (Mode::Tproxy, NET_ADMIN)] {
        let mesh = Mesh::new(mode, Backend::Iptables, &[]);
        let threads = thread_capabilities(mesh.proxy.id());
        assert!(threads.len() >= 2, "the main thread and the runtime's workers: {threads:?}");
        for caps in threads {
            assert_eq!(caps, [kept, kept, NONE, NONE].map(String::from));
        }
    }
    // Even started as root (all capabilities), REDIRECT mode keeps none in any thread.
    let pod = Pod::new();
    let log = std::env::temp_dir().join(format!("{}-capture-proxy.log", pod.name));
    let proxy = ProxyProcess::spawn(pod.cmd(release_bin("capture-proxy")).arg("--allow-any-uid"), log);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !proxy.log_text().contains("ready") {
        assert!(Instant::now() < deadline, "not ready: {}", proxy.log_text());
        std::thread::sleep(Duration::from_millis(20));
    }
    let threads = thread_capabilities(proxy.id());
    drop(proxy);
    for caps in threads {
        assert_eq!(caps, [NONE, NONE, NONE, NONE].map(String::from));
    }
}
