//! The set form (`--use-ip-sets`, issue 15) makes exactly the rule form's capture decisions. For a
//! table of lists, real connections from a pod (as an ordinary user) and into it are captured or not,
//! destination by destination, the same way in both forms of both backends, and as the lists say (worked
//! out here on their own, from the lists as written). In the set form a re-run changes nothing, a set
//! changed behind the tool's back is refused by name, and cleanup leaves the namespace as it found it.
//!
//! ```text
//! [pod: the capture; :15001 "outbound proxy", :15006 "inbound proxy", app ports "app"]
//!   eth0 100.64.0.2, fd00:ffff::2 ── eth0 100.64.0.1, fd00:ffff::1
//! [peer: every address is its own (AnyIP); the probed ports answer "peer"]
//! ```
//!
//! The pod routes every destination to the peer, so an outbound connection is answered by the
//! outbound proxy's port when captured and by the peer when not; an inbound one by the inbound
//! proxy's port (a transparent listener, so that TPROXY cases work too) or by the app.

use std::collections::BTreeSet;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener};
use std::process::{Output, Stdio};

use socket2::{Domain, Socket, Type};

use capture_tests::{istio_iptables, link, release_bin, require_netns, run_ok, serve_peer_address, stderr, Pod};

const IPTABLES: &[&str] = &[];
const NATIVE: &[&str] = &["--native-nftables"];

/// Every run's settings but the lists: Istio's sidecar capture in both families.
#[rustfmt::skip]
const BASE: &[&str] = &["-p", "15001", "-z", "15006", "-u", "1337", "--dual-stack"];

const POD_V4: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 2);
const POD_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xffff, 0, 0, 0, 0, 0, 2);
/// The link between pod and peer: never probed (it is not routed through the peer).
const LINK: [&str; 2] = ["100.64.0.0/30", "fd00:ffff::/126"];
/// Destinations probed in every case besides those the lists give.
const ELSEWHERE: [&str; 4] = ["100.100.100.100", "192.0.2.77", "2001:db8:ffff::77", "fd00:77::1"];
/// The port outbound connections go to when the case is about addresses.
const WEB: u16 = 80;
/// Ports the capture reserves (outbound and inbound proxy, tunnel): never probed inbound.
const RESERVED: [u16; 3] = [15001, 15006, 15008];
/// At most this many outbound probes a case: a random sample (the same each run) when the lists give more.
const MOST_PROBES: usize = 300;
/// The ordinary user the pod's connections come from (not the proxy's 1337).
const APP_USER: &str = "1000";

/// An address range of one family, as numbers (IPv4 in the low 32 bits).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Net {
    v6: bool,
    first: u128,
    last: u128,
}

impl Net {
    /// `ADDR/LEN`, as written in the lists (without host bits).
    fn parse(text: &str) -> Net {
        let (addr, len) = text.split_once('/').unwrap_or_else(|| panic!("not a CIDR: {text}"));
        let (v6, n) = number(addr.parse().unwrap_or_else(|e| panic!("{text}: {e}")));
        let host_bits = width(v6) - len.parse::<u32>().unwrap();
        let host = if host_bits == 0 { 0 } else { u128::MAX >> (128 - host_bits) };
        assert_eq!(n & host, 0, "{text} has host bits");
        Net { v6, first: n, last: n | host }
    }

    fn contains(&self, addr: IpAddr) -> bool {
        let (v6, n) = number(addr);
        v6 == self.v6 && (self.first..=self.last).contains(&n)
    }

    /// The first and last address, and those just below and just above (where the family has them).
    fn edges(&self) -> Vec<IpAddr> {
        let mut edges = vec![self.first, self.last];
        edges.extend(self.first.checked_sub(1));
        edges.extend(self.last.checked_add(1).filter(|&n| n <= max(self.v6)));
        edges.into_iter().map(|n| address(self.v6, n)).collect()
    }
}

fn width(v6: bool) -> u32 {
    if v6 {
        128
    } else {
        32
    }
}

fn max(v6: bool) -> u128 {
    u128::MAX >> (128 - width(v6))
}

fn number(addr: IpAddr) -> (bool, u128) {
    match addr {
        IpAddr::V4(a) => (false, u128::from(u32::from(a))),
        IpAddr::V6(a) => (true, u128::from(a)),
    }
}

fn address(v6: bool, n: u128) -> IpAddr {
    if v6 {
        IpAddr::V6(Ipv6Addr::from(n))
    } else {
        IpAddr::V4(Ipv4Addr::from(u32::try_from(n).unwrap()))
    }
}

fn nets(list: &str) -> Vec<Net> {
    list.split(',').filter(|c| !c.is_empty()).map(Net::parse).collect()
}

fn ports(list: &str) -> Vec<u16> {
    list.split(',').filter(|p| !p.is_empty()).map(|p| p.parse().unwrap()).collect()
}

/// Whether a connection from the pod can reach `addr` through the peer at all: not the link itself,
/// nor an unspecified, loopback, multicast, reserved, link-local or IPv4-in-IPv6 address.
fn routed_to_peer(addr: IpAddr) -> bool {
    let special = match addr {
        IpAddr::V4(a) => a.octets()[0] == 0 || a.is_loopback() || a.octets()[0] >= 224,
        IpAddr::V6(a) => {
            let s = a.segments();
            s[..5] == [0; 5] || s[0] >= 0xff00 || s[0] & 0xffc0 == 0xfe80
        }
    };
    !special && !LINK.iter().any(|l| Net::parse(l).contains(addr))
}

/// The lists of one run, as given to the tool (`-i`, `-x`, `-o`, `-q`, `-b`, `-d`).
#[derive(Debug, Clone)]
struct Lists {
    include: String,
    exclude: String,
    ports_exclude: String,
    ports_include: String,
    inbound: String,
    inbound_exclude: String,
    /// Inbound capture by TPROXY in mangle (`-m TPROXY`), not REDIRECT in nat.
    tproxy: bool,
}

impl Default for Lists {
    /// Istio's sidecar defaults: everything captured, both ways, but the proxy's own ports inbound.
    fn default() -> Lists {
        Lists {
            include: "*".into(),
            exclude: String::new(),
            ports_exclude: String::new(),
            ports_include: String::new(),
            inbound: "*".into(),
            inbound_exclude: "15090,15021,15020".into(),
            tproxy: false,
        }
    }
}

/// Where a connection went: to the proxy's port, or on to where it was going.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Verdict {
    Captured,
    NotCaptured,
}

impl Verdict {
    fn captured_if(captured: bool) -> Verdict {
        if captured {
            Verdict::Captured
        } else {
            Verdict::NotCaptured
        }
    }
}

impl Lists {
    fn excluding(cidrs: &str) -> Lists {
        Lists { exclude: cidrs.into(), ..Lists::default() }
    }

    fn including(cidrs: &str, excluded: &str) -> Lists {
        Lists { include: cidrs.into(), exclude: excluded.into(), ..Lists::default() }
    }

    fn args(&self) -> Vec<String> {
        let pairs = [
            ("-i", &self.include),
            ("-x", &self.exclude),
            ("-o", &self.ports_exclude),
            ("-q", &self.ports_include),
            ("-b", &self.inbound),
            ("-d", &self.inbound_exclude),
        ];
        let mode = if self.tproxy { "TPROXY" } else { "REDIRECT" };
        let lists = pairs.into_iter().flat_map(|(flag, value)| [flag.to_string(), value.clone()]);
        ["-m".to_string(), mode.to_string()].into_iter().chain(lists).collect()
    }

    /// What Istio's rules decide for an outbound TCP connection to `dest`, in their order:
    /// excluded ports, excluded ranges, included ports, included ranges.
    fn outbound(&self, dest: SocketAddr) -> Verdict {
        let (addr, port) = (dest.ip(), dest.port());
        Verdict::captured_if(
            !ports(&self.ports_exclude).contains(&port)
                && !nets(&self.exclude).iter().any(|n| n.contains(addr))
                && (ports(&self.ports_include).contains(&port)
                    || self.include == "*"
                    || nets(&self.include).iter().any(|n| n.contains(addr))),
        )
    }

    /// What they decide for an inbound TCP connection to `port` (never a reserved one).
    fn inbound(&self, port: u16) -> Verdict {
        Verdict::captured_if(match self.inbound.as_str() {
            "*" => !ports(&self.inbound_exclude).contains(&port),
            only => ports(only).contains(&port),
        })
    }

    /// Outbound probes: every edge of every listed range and a few addresses elsewhere, to each port
    /// a list names (with its neighbours), or to [`WEB`]; sampled down to [`MOST_PROBES`].
    fn outbound_probes(&self) -> Vec<SocketAddr> {
        let mut addrs: Vec<IpAddr> = ELSEWHERE.iter().map(|a| a.parse().unwrap()).collect();
        let include = if self.include == "*" { "" } else { &self.include };
        addrs.extend(nets(&self.exclude).iter().chain(&nets(include)).flat_map(Net::edges));
        let addrs = unique(addrs.into_iter().filter(|&a| routed_to_peer(a)));
        let mut to = neighbours(&[ports(&self.ports_exclude), ports(&self.ports_include)].concat());
        to.insert(WEB);
        let probes: Vec<SocketAddr> = addrs.iter().flat_map(|&a| to.iter().map(move |&p| SocketAddr::new(a, p))).collect();
        let mut probes = sample(probes, MOST_PROBES);
        probes.extend(self.drift_probe(false).filter(|p| !probes.contains(p)));
        probes
    }

    /// Inbound probes: both pod addresses, to each inbound port a list names and its neighbours.
    fn inbound_probes(&self) -> Vec<SocketAddr> {
        let listed = if self.inbound == "*" { &self.inbound_exclude } else { &self.inbound };
        let to = neighbours(&ports(listed));
        let pod = [IpAddr::V4(POD_V4), IpAddr::V6(POD_V6)];
        let mut probes: Vec<SocketAddr> = pod.iter().flat_map(|&a| to.iter().map(move |&p| SocketAddr::new(a, p))).collect();
        probes.extend(self.drift_probe(true).filter(|p| !probes.contains(p)));
        probes
    }

    /// The probe, inbound or not, that sees whether the element [`Lists::drift`] adds is in its
    /// set: a connection to that address, or to that port.
    fn drift_probe(&self, inbound: bool) -> Option<SocketAddr> {
        let (set, element) = self.drift();
        let probe = if set.starts_with("istio-out-cidrs-") {
            SocketAddr::new(element.parse().unwrap(), WEB)
        } else if set.starts_with("istio-in-") {
            SocketAddr::new(IpAddr::V4(POD_V4), element.parse().unwrap())
        } else {
            SocketAddr::new(ELSEWHERE[0].parse().unwrap(), element.parse().unwrap())
        };
        (set.starts_with("istio-in-") == inbound).then_some(probe)
    }

    /// A set of this run's set form, and an element it lacks: the first range list with a family it
    /// does not wholly cover, else the first port list.
    fn drift(&self) -> (String, String) {
        let spare: [&[&str]; 2] = [&["192.0.2.200", "198.51.100.200", "100.101.0.1"], &["2001:db8:ffff::200", "fd00:ffff:1::1"]];
        let include = if self.include == "*" { "" } else { &self.include };
        for (list, cidrs) in [("istio-out-cidrs-exclude", &self.exclude[..]), ("istio-out-cidrs-include", include)] {
            for (v6, family) in [(false, "v4"), (true, "v6")] {
                let family_nets: Vec<Net> = nets(cidrs).into_iter().filter(|n| n.v6 == v6).collect();
                let free = spare[usize::from(v6)].iter().find(|a| !family_nets.iter().any(|n| n.contains(a.parse().unwrap())));
                if let (false, Some(free)) = (family_nets.is_empty(), free) {
                    return (format!("{list}-{family}"), free.to_string());
                }
            }
        }
        let (inbound_list, inbound_ports) = match self.inbound.as_str() {
            "*" => ("istio-in-ports-exclude", &self.inbound_exclude),
            _ => ("istio-in-ports-include", &self.inbound),
        };
        let port_lists = [
            ("istio-out-ports-exclude", &self.ports_exclude),
            ("istio-out-ports-include", &self.ports_include),
            (inbound_list, inbound_ports),
        ];
        let (list, listed) = port_lists.into_iter().find(|(_, p)| !p.is_empty()).expect("a case with a list");
        let free = (1..).find(|p| !ports(listed).contains(p)).unwrap();
        (list.to_string(), free.to_string())
    }
}

/// Each port and the ones just below and above (never 0), without the reserved ones.
fn neighbours(listed: &[u16]) -> BTreeSet<u16> {
    let near = listed.iter().flat_map(|&p| [p.checked_sub(1), Some(p), p.checked_add(1)]).flatten();
    near.filter(|p| *p != 0 && !RESERVED.contains(p)).collect()
}

/// `items` without repeats, in their order.
fn unique<T: Ord + Copy>(items: impl Iterator<Item = T>) -> Vec<T> {
    let mut seen = BTreeSet::new();
    items.filter(|&item| seen.insert(item)).collect()
}

/// `most` of `items` picked at random (the same each run), in their order.
fn sample<T>(items: Vec<T>, most: usize) -> Vec<T> {
    if items.len() <= most {
        return items;
    }
    let mut state: u64 = 0x5eed;
    let mut indices: Vec<usize> = (0..items.len()).collect();
    for i in 0..most {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let j = i + (state >> 33) as usize % (items.len() - i);
        indices.swap(i, j);
    }
    let kept: BTreeSet<usize> = indices[..most].iter().copied().collect();
    items.into_iter().enumerate().filter(|(i, _)| kept.contains(i)).map(|(_, t)| t).collect()
}

/// One row of the table: a name for the lists, and the lists.
struct Case {
    name: &'static str,
    lists: Lists,
}

fn case(name: &'static str, lists: Lists) -> Case {
    Case { name, lists }
}

/// `-x` lists, everything else captured.
fn excluded_ranges() -> Vec<Case> {
    vec![
        case("IPv4", Lists::excluding("10.0.0.0/8,172.16.0.0/12,192.168.0.0/16,203.0.113.0/24")),
        case("IPv6", Lists::excluding("fd00:1::/32,2001:db8:1::/48,2001:db8:2::/64")),
        case("mixed", Lists::excluding("10.96.0.0/12,fd00:96::/108,203.0.113.7/32,2001:db8::/32")),
        case("overlapping and adjacent", Lists::excluding(OVERLAPPING_AND_ADJACENT)),
        case("IPv4 /0", Lists::excluding("0.0.0.0/0,2001:db8::/32")),
        case("IPv6 /0", Lists::excluding("::/0,10.0.0.0/8")),
        case("/32 and /128", Lists::excluding(HOSTS)),
        case("duplicates", Lists::excluding("10.5.0.0/16,fd00:5::/64,10.5.0.0/16,fd00:5::/64,10.5.0.0/16")),
        case("one entry", Lists::excluding("192.0.2.0/24")),
    ]
}

/// Ranges inside others, and neighbours that join into ranges no single prefix covers.
const OVERLAPPING_AND_ADJACENT: &str = "10.1.0.0/16,10.1.2.0/24,10.1.2.128/25,10.2.0.0/16,10.3.0.0/17,10.3.128.0/17,\
     10.4.0.0/16,10.5.0.0/16,10.6.0.0/15,10.8.0.0/16,10.9.0.0/16,10.10.0.0/16,\
     fd00:a::/64,fd00:a::/80,fd00:a:0:1::/64,fd00:a:0:2::/63,fd00:a:0:4::/64";

/// Single addresses, two of them neighbours that are no /31 or /127.
const HOSTS: &str = "198.51.100.1/32,198.51.100.3/32,198.51.100.4/32,2001:db8::1/128,2001:db8::3/128,2001:db8::4/128";

/// `-i` lists, some with `-x` holes in them.
fn included_ranges() -> Vec<Case> {
    vec![
        case("IPv4 only, IPv6 left alone", Lists::including("10.0.0.0/8,192.168.0.0/16", "")),
        case(
            "mixed, with excluded holes",
            Lists::including("10.0.0.0/8,fd00:96::/64,2001:db8::5/128", "10.1.0.0/16,fd00:96::8000/113"),
        ),
        case("overlapping and adjacent", Lists::including(OVERLAPPING_AND_ADJACENT, "")),
        case("/0 and /128, with a /32 hole", Lists::including("0.0.0.0/0,2001:db8::1/128", "198.51.100.1/32")),
    ]
}

/// `n` ports from `first`, `step` apart, as a list.
fn port_run(first: u16, step: u16, n: u16) -> String {
    (0..n).map(|i| (first + i * step).to_string()).collect::<Vec<_>>().join(",")
}

/// Port lists longer than multiport's 15, outbound and inbound.
fn port_lists() -> Vec<Case> {
    let excluded = "22,25,53,110,143,443,465,587,993,995,3306,5432,6379,8443,9000,9001,9002,9003,11211,27017";
    let always = [port_run(3000, 1, 16), port_run(3020, 10, 4)].join(",");
    vec![
        case("-o: 20 ports", Lists { ports_exclude: excluded.into(), ..Lists::default() }),
        case(
            "-q: 20 ports, beside -i and -x ranges and -o ports (two of them also in -q)",
            Lists {
                ports_include: always,
                ports_exclude: "3005,3010,5000".into(),
                ..Lists::including("198.18.0.0/15,fd00:18::/32", "198.18.5.0/24,fd00:18:5::/48")
            },
        ),
        case("-b '*' -d: 20 ports", Lists { inbound_exclude: port_run(8000, 2, 20), ..Lists::default() }),
        case(
            "-b: 20 ports",
            Lists {
                inbound: [port_run(9100, 1, 10), port_run(9200, 100, 10)].join(","),
                inbound_exclude: String::new(),
                ..Lists::default()
            },
        ),
        // TPROXY: the inbound lists are matched in mangle, where the TPROXY rules are.
        case("-m TPROXY -b '*' -d: 20 ports", Lists { inbound_exclude: port_run(8100, 3, 20), tproxy: true, ..Lists::default() }),
        case(
            "-m TPROXY -b: 20 ports",
            Lists { inbound: port_run(9400, 7, 20), inbound_exclude: String::new(), tproxy: true, ..Lists::default() },
        ),
    ]
}

/// 5,000 `-x` ranges in no order: 4,000 IPv4 /24s every other /24, every fifth a /23 that reaches
/// its neighbour; 1,000 IPv6 /64s the same way, every third a /63.
fn five_thousand() -> Vec<Case> {
    let v4 = (0..4000).map(|i| format!("10.{}.{}.0/{}", 100 + i / 125, (i % 125) * 2, if i % 5 == 0 { 23 } else { 24 }));
    let v6 = (0..1000).map(|j| format!("fd00:5000:0:{:x}::/{}", j * 2, if j % 3 == 0 { 63 } else { 64 }));
    let ordered: Vec<String> = v4.chain(v6).collect();
    // 7919 is prime to 5000: every entry once, scattered.
    let scattered: Vec<&str> = (0..ordered.len()).map(|i| ordered[i * 7919 % ordered.len()].as_str()).collect();
    assert_eq!(scattered.iter().collect::<BTreeSet<_>>().len(), 5000);
    vec![case("5,000 entries", Lists::excluding(&scattered.join(",")))]
}

/// The pod and its peer, with a listener on every port the cases probe.
struct Topology {
    pod: Pod,
    peer: Pod,
}

impl Topology {
    fn new(cases: &[Case]) -> Topology {
        let (pod, peer) = (Pod::new(), Pod::new());
        link(&pod, "eth0", "100.64.0.2/30", &peer, "eth0", "100.64.0.1/30");
        peer.sh("ip -6 addr add fd00:ffff::1/126 dev eth0 nodad");
        pod.sh("ip -6 addr add fd00:ffff::2/126 dev eth0 nodad");
        pod.sh("ip route add default via 100.64.0.1 && ip -6 route add default via fd00:ffff::1");
        // AnyIP, in table main rather than local (where `ip route add local` puts it): there the
        // link's own route is more specific, so replies to the pod's addresses leave the peer.
        peer.sh("ip route add local 0.0.0.0/0 dev lo table main && ip -6 route add local ::/0 dev lo table main");
        serve(&pod, 15001, "outbound proxy");
        serve_transparent(&pod, 15006, "inbound proxy");
        let inbound: BTreeSet<u16> = cases.iter().flat_map(|c| c.lists.inbound_probes()).map(|a| a.port()).collect();
        for port in inbound {
            serve(&pod, port, "app");
        }
        let outbound: BTreeSet<u16> = cases.iter().flat_map(|c| c.lists.outbound_probes()).map(|a| a.port()).collect();
        for port in outbound {
            serve(&peer, port, "peer");
        }
        pod.settle_ipv6();
        peer.settle_ipv6();
        Topology { pod, peer }
    }

    /// What answered each outbound probe (from the pod) and each inbound one (from the peer).
    fn answers(&self, probes: &Probes) -> Answers {
        Answers { outbound: http_probe(&self.pod, &probes.outbound), inbound: http_probe(&self.peer, &probes.inbound) }
    }
}

/// A listener on `port` of every address in `pod` (one socket, both families), answering `who saw PEER`.
fn serve(pod: &Pod, port: u16, who: &'static str) {
    let listener = pod.enter(|| TcpListener::bind((Ipv6Addr::UNSPECIFIED, port)));
    serve_peer_address(listener.unwrap_or_else(|e| panic!("{who} on :{port}: {e}")), who);
}

/// [`serve`], for TPROXY too: the kernel hands a TPROXY'd connection only to a transparent listener.
fn serve_transparent(pod: &Pod, port: u16, who: &'static str) {
    let listener = pod.enter(|| -> std::io::Result<TcpListener> {
        let socket = Socket::new(Domain::IPV6, Type::STREAM, None)?;
        socket.set_only_v6(false)?;
        socket.set_ip_transparent_v6(true)?;
        socket.bind(&SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)).into())?;
        socket.listen(128)?;
        Ok(socket.into())
    });
    serve_peer_address(listener.unwrap_or_else(|e| panic!("{who} on :{port}: {e}")), who);
}

/// The answer to `GET /` on each of `probes`, dialled from `pod` by [`APP_USER`].
fn http_probe(pod: &Pod, probes: &[SocketAddr]) -> Vec<String> {
    let mut cmd = pod.cmd("setpriv");
    cmd.args([&format!("--reuid={APP_USER}"), &format!("--regid={APP_USER}"), "--clear-groups"]);
    cmd.arg(release_bin("http-probe")).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("start http-probe");
    let input: String = probes.iter().map(|p| format!("{p}\n")).collect();
    // http-probe reads all its input before it writes anything.
    child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "http-probe failed ({}): {}", out.status, stderr(&out));
    let answers: Vec<String> = String::from_utf8_lossy(&out.stdout).lines().map(str::to_string).collect();
    assert_eq!(answers.len(), probes.len(), "one answer a probe");
    answers
}

/// The verdict an answer means: the proxy's listener answered, or the one the connection was for.
fn verdict(answer: &str, proxy: &str, destination: &str) -> Option<Verdict> {
    let by = |who: &str| answer.starts_with(&format!("{who} saw "));
    (by(proxy) || by(destination)).then(|| Verdict::captured_if(by(proxy)))
}

/// The connections a case makes, and what the lists say of each.
struct Probes {
    outbound: Vec<SocketAddr>,
    inbound: Vec<SocketAddr>,
    expected_outbound: Vec<Verdict>,
    expected_inbound: Vec<Verdict>,
}

impl Probes {
    fn of(lists: &Lists) -> Probes {
        let (outbound, inbound) = (lists.outbound_probes(), lists.inbound_probes());
        let expected_outbound = outbound.iter().map(|&p| lists.outbound(p)).collect();
        let expected_inbound = inbound.iter().map(|p| lists.inbound(p.port())).collect();
        Probes { outbound, inbound, expected_outbound, expected_inbound }
    }

    /// Whether some probes are captured and some not (else the case shows nothing).
    fn both_verdicts(&self) -> bool {
        self.expected_outbound.iter().chain(&self.expected_inbound).collect::<BTreeSet<_>>().len() == 2
    }

    /// What went otherwise than the lists say in the forms' answers (each form's name and answers),
    /// one line a probe.
    fn wrong(&self, forms: &[(&str, Answers)]) -> Option<String> {
        let outbound: Vec<(&str, &[String])> = forms.iter().map(|(form, a)| (*form, &a.outbound[..])).collect();
        let inbound: Vec<(&str, &[String])> = forms.iter().map(|(form, a)| (*form, &a.inbound[..])).collect();
        let mut wrong = wrong_decisions(&self.expected_outbound, &self.outbound, &outbound, ("outbound proxy", "peer"));
        wrong.extend(wrong_decisions(&self.expected_inbound, &self.inbound, &inbound, ("inbound proxy", "app")));
        let total = self.outbound.len() + self.inbound.len();
        let shown = wrong[..wrong.len().min(10)].join("\n  ");
        (!wrong.is_empty())
            .then(|| format!("{} of {total} probes decided otherwise than the lists say, such as:\n  {shown}", wrong.len()))
    }
}

/// What answered each probe.
struct Answers {
    outbound: Vec<String>,
    inbound: Vec<String>,
}

/// One line for each probe that some form decided otherwise than `expected`; `forms` holds each
/// form's name and answers.
fn wrong_decisions(
    expected: &[Verdict],
    probes: &[SocketAddr],
    forms: &[(&str, &[String])],
    (proxy, destination): (&str, &str),
) -> Vec<String> {
    let wrong = |i: usize| forms.iter().any(|(_, answers)| verdict(&answers[i], proxy, destination) != Some(expected[i]));
    let answers = |i: usize| forms.iter().map(|(form, answers)| format!("; {form}: {}", answers[i])).collect::<String>();
    (0..probes.len())
        .filter(|&i| wrong(i))
        .map(|i| format!("{}: the lists say {:?}{}", probes[i], expected[i], answers(i)))
        .collect()
}

/// The runs of one case with one backend.
struct Runs {
    rule_form: Vec<String>,
    set_form: Vec<String>,
    /// The set form with `--reconcile`.
    reconcile: Vec<String>,
    cleanup: Vec<String>,
}

impl Runs {
    fn new(backend: &[&str], lists: &Lists) -> Runs {
        let strings = |args: &[&str]| args.iter().map(|a| a.to_string()).collect::<Vec<_>>();
        let rule_form: Vec<String> = strings(&[BASE, backend].concat()).into_iter().chain(lists.args()).collect();
        let set_form: Vec<String> = rule_form.iter().cloned().chain(strings(&["--use-ip-sets"])).collect();
        let reconcile = set_form.iter().cloned().chain(strings(&["--reconcile"])).collect();
        Runs { rule_form, set_form, reconcile, cleanup: strings(&[backend, &["--cleanup-only"]].concat()) }
    }
}

/// Everything a capture may leave in the namespace, byte for byte: nftables (with handles, so
/// that a re-created object shows), the rules of both iptables variants and families, the ip sets.
fn kernel_state(pod: &Pod) -> String {
    let ipsets = pod.cmd("ipset").arg("save").output().expect("ipset (scripts/provision.sh installs it)");
    assert!(ipsets.status.success(), "ipset save: {}", stderr(&ipsets));
    let ipsets = String::from_utf8_lossy(&ipsets.stdout);
    format!("{}{}{}{ipsets}", pod.nft_ruleset_with_handles(), pod.iptables_save(false), pod.iptables_save(true))
}

/// `Err` with the lines only one of two states has (a state of 5,000 rules is too long to show whole).
fn same_state(now: &str, before: &str) -> Result<(), String> {
    if now == before {
        return Ok(());
    }
    let only = |a: &str, b: &str| -> String {
        let lines: BTreeSet<&str> = b.lines().collect();
        let extra: Vec<&str> = a.lines().filter(|l| !lines.contains(l)).collect();
        format!("{} lines, the first: {:#?}", extra.len(), &extra[..extra.len().min(8)])
    };
    Err(format!("only now: {}\nonly before: {}", only(now, before), only(before, now)))
}

fn backend_name(backend: &[&str]) -> &'static str {
    if backend == NATIVE {
        "native nftables"
    } else {
        "iptables"
    }
}

/// What a run said, without the settings it logs first.
fn said(out: &Output) -> String {
    let text = stderr(out);
    let kept = text.lines().filter(|l| !l.contains("\tinfo\t") && !l.split_once('=').is_some_and(|(k, _)| is_setting(k)));
    kept.collect::<Vec<_>>().join("\n")
}

fn is_setting(key: &str) -> bool {
    !key.is_empty() && key.bytes().all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
}

fn tool(pod: &Pod, args: &[String]) -> Output {
    istio_iptables(pod, &args.iter().map(String::as_str).collect::<Vec<_>>(), &[])
}

/// Adds `element` to our set `set` behind the tool's back; `Err` when there is no such set.
fn add_element(pod: &Pod, backend: &[&str], set: &str, element: &str) -> Result<(), String> {
    let mut cmd = if backend == NATIVE {
        let listing = run_ok(pod.cmd("nft").args(["-j", "list", "sets"]));
        let listing: serde_json::Value = serde_json::from_slice(&listing.stdout).unwrap();
        let items = listing["nftables"].as_array().cloned().unwrap_or_default();
        let found = items.iter().map(|item| &item["set"]).find(|s| s["name"] == set);
        let (family, table) = found
            .map(|s| (s["family"].as_str().unwrap().to_string(), s["table"].as_str().unwrap().to_string()))
            .ok_or_else(|| format!("no nftables set {set} in:\n{}", pod.nft_ruleset()))?;
        let mut cmd = pod.cmd("nft");
        cmd.args(["add", "element", &family, &table, set, &format!("{{ {element} }}")]);
        cmd
    } else {
        let mut cmd = pod.cmd("ipset");
        cmd.args(["add", set, element]);
        cmd
    };
    let out = cmd.output().unwrap();
    out.status.success().then_some(()).ok_or_else(|| format!("{cmd:?} failed: {}", stderr(&out)))
}

/// `args` applied, or what the tool said.
fn applied(pod: &Pod, args: &[String]) -> Result<(), String> {
    let out = tool(pod, args);
    out.status.success().then_some(()).ok_or_else(|| format!("istio-iptables failed ({}): {}", out.status, said(&out)))
}

/// Whether running `args` again, with them in place, exits 0, says so and changes nothing.
fn rerun_is_a_no_op(pod: &Pod, args: &[String]) -> Result<(), String> {
    let before = kernel_state(pod);
    let out = tool(pod, args);
    if !out.status.success() || !stderr(&out).contains("already in place") {
        return Err(format!("a re-run exited {} saying: {}", out.status, said(&out)));
    }
    same_state(&kernel_state(pod), &before).map_err(|diff| format!("a re-run changed the kernel's state:\n{diff}"))
}

/// Whether, with an element added to one of the sets behind the tool's back, running `args`
/// again fails naming that set, and changes nothing.
fn drift_is_refused(pod: &Pod, backend: &[&str], lists: &Lists, args: &[String]) -> Result<(), String> {
    let (set, element) = lists.drift();
    add_element(pod, backend, &set, &element)?;
    let drifted = kernel_state(pod);
    let out = tool(pod, args);
    if out.status.success() || !stderr(&out).contains(&set) {
        return Err(format!("with {element} added to {set}, a re-run exited {} saying: {}", out.status, said(&out)));
    }
    same_state(&kernel_state(pod), &drifted).map_err(|diff| format!("the refused re-run changed the kernel's state:\n{diff}"))
}

/// Runs `cleanup` and fails the test unless the namespace is back to `untouched` (the next case
/// starts from it).
fn assert_cleaned_up(pod: &Pod, cleanup: &[String], untouched: &str, what: &str) {
    applied(pod, cleanup).unwrap_or_else(|e| panic!("{what}: --cleanup-only: {e}"));
    if let Err(diff) = same_state(&kernel_state(pod), untouched) {
        panic!("{what}: cleanup left the namespace otherwise than it found it:\n{diff}");
    }
}

/// One case with one backend: the rule form, then the set form, decide every probe as the lists
/// say, and a re-run of either is a no-op; in the set form, drift is refused, and `--reconcile`
/// then puts back the lists' decisions for good; cleanup leaves nothing. Returns what went otherwise.
fn check(top: &Topology, backend: &[&str], case: &Case) -> Vec<String> {
    let (pod, lists) = (&top.pod, &case.lists);
    let what = format!("{} with {}", case.name, backend_name(backend));
    let probes = Probes::of(lists);
    assert!(probes.both_verdicts(), "{what}: the probes must include connections captured and connections not");
    let runs = Runs::new(backend, lists);
    let untouched = kernel_state(pod);
    let mut problems = Vec::new();

    // Each form's answers to the probes, by name.
    let mut forms = Vec::new();
    match applied(pod, &runs.rule_form) {
        Ok(()) => {
            forms.push(("rule form", top.answers(&probes)));
            problems.extend(rerun_is_a_no_op(pod, &runs.rule_form).err().map(|e| format!("rule form: {e}")));
        }
        Err(e) => problems.push(format!("rule form: {e}")),
    }
    assert_cleaned_up(pod, &runs.cleanup, &untouched, &format!("{what}, rule form"));

    let set_form_checks = applied(pod, &runs.set_form).and_then(|()| {
        forms.push(("set form", top.answers(&probes)));
        rerun_is_a_no_op(pod, &runs.set_form)?;
        drift_is_refused(pod, backend, lists, &runs.set_form)?;
        applied(pod, &runs.reconcile).map_err(|e| format!("--reconcile after the drift: {e}"))?;
        forms.push(("set form after --reconcile", top.answers(&probes)));
        rerun_is_a_no_op(pod, &runs.set_form).map_err(|e| format!("after --reconcile: {e}"))
    });
    problems.extend(set_form_checks.err().map(|e| format!("set form: {e}")));
    assert_cleaned_up(pod, &runs.cleanup, &untouched, &format!("{what}, set form"));

    problems.extend(probes.wrong(&forms));
    problems.into_iter().map(|p| format!("{what}: {p}")).collect()
}

/// Every case of `cases` with `backend`, in one topology (each case leaves it as it found it).
fn check_all(backend: &[&str], cases: &[Case]) {
    require_netns!();
    let top = Topology::new(cases);
    let problems: Vec<String> = cases.iter().flat_map(|case| check(&top, backend, case)).collect();
    assert!(problems.is_empty(), "{} problems:\n\n{}", problems.len(), problems.join("\n\n"));
}

/// The set form reconciled from each case's lists straight into the next's, so that sets are
/// created, replaced and destroyed on the way: every probe is decided as the lists in place say,
/// and a re-run is a no-op; cleanup at the end leaves nothing.
fn check_reconciles_from_case_to_case(backend: &[&str], cases: &[Case]) {
    require_netns!();
    let top = Topology::new(cases);
    let untouched = kernel_state(&top.pod);
    let mut problems = Vec::new();
    for case in cases {
        let (runs, probes) = (Runs::new(backend, &case.lists), Probes::of(&case.lists));
        let mut wrong = None;
        let checks = applied(&top.pod, &runs.reconcile).and_then(|()| {
            wrong = probes.wrong(&[("set form", top.answers(&probes))]);
            rerun_is_a_no_op(&top.pod, &runs.set_form)
        });
        let what = format!("{} with {}", case.name, backend_name(backend));
        problems.extend(wrong.into_iter().chain(checks.err()).map(|p| format!("{what}: {p}")));
    }
    assert_cleaned_up(&top.pod, &Runs::new(backend, &cases[0].lists).cleanup, &untouched, "after the last case");
    assert!(problems.is_empty(), "{} problems:\n\n{}", problems.len(), problems.join("\n\n"));
}

/// Every case, in an order where each list differs from the one before.
fn all_cases() -> Vec<Case> {
    [five_thousand(), excluded_ranges(), included_ranges(), port_lists()].into_iter().flatten().collect()
}

#[test]
#[cfg_attr(netns_unavailable, ignore = "needs root and network namespaces")]
fn set_form_reconciled_from_list_to_list_decides_as_each_says_with_iptables() {
    check_reconciles_from_case_to_case(IPTABLES, &all_cases());
}

#[test]
#[cfg_attr(netns_unavailable, ignore = "needs root and network namespaces")]
fn set_form_reconciled_from_list_to_list_decides_as_each_says_with_native_nftables() {
    check_reconciles_from_case_to_case(NATIVE, &all_cases());
}

#[test]
#[cfg_attr(netns_unavailable, ignore = "needs root and network namespaces")]
fn excluded_ranges_decide_alike_in_both_forms_with_iptables() {
    check_all(IPTABLES, &excluded_ranges());
}

#[test]
#[cfg_attr(netns_unavailable, ignore = "needs root and network namespaces")]
fn excluded_ranges_decide_alike_in_both_forms_with_native_nftables() {
    check_all(NATIVE, &excluded_ranges());
}

#[test]
#[cfg_attr(netns_unavailable, ignore = "needs root and network namespaces")]
fn included_ranges_decide_alike_in_both_forms_with_iptables() {
    check_all(IPTABLES, &included_ranges());
}

#[test]
#[cfg_attr(netns_unavailable, ignore = "needs root and network namespaces")]
fn included_ranges_decide_alike_in_both_forms_with_native_nftables() {
    check_all(NATIVE, &included_ranges());
}

#[test]
#[cfg_attr(netns_unavailable, ignore = "needs root and network namespaces")]
fn port_lists_decide_alike_in_both_forms_with_iptables() {
    check_all(IPTABLES, &port_lists());
}

#[test]
#[cfg_attr(netns_unavailable, ignore = "needs root and network namespaces")]
fn port_lists_decide_alike_in_both_forms_with_native_nftables() {
    check_all(NATIVE, &port_lists());
}

#[test]
#[cfg_attr(netns_unavailable, ignore = "needs root and network namespaces")]
fn five_thousand_excluded_ranges_decide_alike_in_both_forms_with_iptables() {
    check_all(IPTABLES, &five_thousand());
}

#[test]
#[cfg_attr(netns_unavailable, ignore = "needs root and network namespaces")]
fn five_thousand_excluded_ranges_decide_alike_in_both_forms_with_native_nftables() {
    check_all(NATIVE, &five_thousand());
}
