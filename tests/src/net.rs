//! Two network namespaces joined by a veth pair, optionally with a one-way firewall.

use std::ffi::OsStr;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use crate::{run_timeout, sys};

/// The ruleset from TESTING.md: the inside may dial out, nothing may connect in.
const FIREWALL: &str = "table inet fw {
 chain input {
  type filter hook input priority 0; policy drop;
  iif lo accept
  ct state established,related accept
 }
}
";

/// A Command running `program` inside network namespace `ns` (`ip netns exec NS program`).
pub fn netns_cmd(ns: &str, program: impl AsRef<OsStr>) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns]).arg(program);
    cmd
}

/// Runs `f` on a new thread that has entered network namespace `ns`, and returns what it
/// returns: sockets made there (a listener, a connection) stay in `ns` and can be used
/// from any thread.
pub fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = Path::new("/run/netns").join(ns);
    std::thread::spawn(move || {
        let file =
            std::fs::File::open(&path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
        sys::enter_netns(&file).unwrap_or_else(|e| panic!("setns {}: {e}", path.display()));
        f()
    })
    .join()
    .unwrap_or_else(|p| std::panic::resume_unwind(p))
}

/// Two network namespaces ("inside" and "outside") joined by a veth pair; removed on drop.
pub struct NetPair {
    inside: String,
    outside: String,
    inside_dev: String,
    outside_dev: String,
    inside_ip: String,
    outside_ip: String,
    created: Vec<String>,
}

impl NetPair {
    /// Creates the pair; with `firewall`, the inside drops every inbound connection.
    pub fn new(firewall: bool) -> NetPair {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        assert!(
            crate::is_root(),
            "NetPair needs root (ip netns, veth, nftables)"
        );
        let c = NEXT.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        // 512 /24 networks in 198.18.0.0/15; distinct for consecutive pairs of this process.
        let idx = (pid.wrapping_mul(97).wrapping_add(c)) % 512;
        let net = format!("198.{}.{}", 18 + idx / 256, idx % 256);
        let mut pair = NetPair {
            inside: format!("rin{pid}x{c}"),
            outside: format!("rout{pid}x{c}"),
            inside_dev: format!("vi{pid}x{c}"),
            outside_dev: format!("vo{pid}x{c}"),
            inside_ip: format!("{net}.1"),
            outside_ip: format!("{net}.2"),
            created: Vec::new(),
        };
        assert!(pair.inside_dev.len() <= 15 && pair.outside_dev.len() <= 15);
        // From here on a panic drops `pair`, which removes whatever was created.
        for ns in [pair.inside.clone(), pair.outside.clone()] {
            if Path::new("/run/netns").join(&ns).exists() {
                // Left behind by an earlier process with the same pid.
                kill_all_in(&ns);
                let _ = ip(&["netns", "del", &ns]);
            }
            ip(&["netns", "add", &ns]).unwrap_or_else(|e| panic!("ip netns add {ns}: {e}"));
            pair.created.push(ns.clone());
            ip(&["-n", &ns, "link", "set", "lo", "up"])
                .unwrap_or_else(|e| panic!("lo up in {ns}: {e}"));
        }
        ip(&[
            "link",
            "add",
            &pair.inside_dev,
            "netns",
            &pair.inside,
            "type",
            "veth",
            "peer",
            "name",
            &pair.outside_dev,
            "netns",
            &pair.outside,
        ])
        .unwrap_or_else(|e| panic!("create veth pair: {e}"));
        for (ns, dev, ip_addr) in [
            (&pair.inside, &pair.inside_dev, &pair.inside_ip),
            (&pair.outside, &pair.outside_dev, &pair.outside_ip),
        ] {
            ip(&[
                "-n",
                ns,
                "addr",
                "add",
                &format!("{ip_addr}/24"),
                "dev",
                dev,
            ])
            .unwrap_or_else(|e| panic!("address {ip_addr} on {dev}: {e}"));
            ip(&["-n", ns, "link", "set", dev, "up"])
                .unwrap_or_else(|e| panic!("{dev} up in {ns}: {e}"));
        }
        if firewall {
            pair.load_nft(FIREWALL);
        }
        pair
    }

    /// Loads an nftables ruleset (text for `nft -f`) into the inside namespace.
    pub fn load_nft(&self, ruleset: &str) {
        nft_in(&self.inside, ruleset).unwrap_or_else(|e| panic!("nft -f in {}: {e}", self.inside));
    }

    /// Name of the inside namespace (the firewalled one).
    pub fn inside_ns(&self) -> &str {
        &self.inside
    }

    /// Name of the outside namespace.
    pub fn outside_ns(&self) -> &str {
        &self.outside
    }

    /// Address of the inside veth end (198.18.N.1 or 198.19.N.1).
    pub fn inside_ip(&self) -> &str {
        &self.inside_ip
    }

    /// Address of the outside veth end (198.18.N.2 or 198.19.N.2).
    pub fn outside_ip(&self) -> &str {
        &self.outside_ip
    }

    /// Interface name of the inside veth end.
    pub fn inside_dev(&self) -> &str {
        &self.inside_dev
    }

    /// Interface name of the outside veth end.
    pub fn outside_dev(&self) -> &str {
        &self.outside_dev
    }

    /// A Command running `program` inside namespace `ns` (same as [`netns_cmd`]).
    pub fn cmd_in(&self, ns: &str, program: impl AsRef<OsStr>) -> Command {
        netns_cmd(ns, program)
    }

    /// A Command running `program` in the inside namespace.
    pub fn cmd_inside(&self, program: impl AsRef<OsStr>) -> Command {
        netns_cmd(&self.inside, program)
    }

    /// A Command running `program` in the outside namespace.
    pub fn cmd_outside(&self, program: impl AsRef<OsStr>) -> Command {
        netns_cmd(&self.outside, program)
    }

    /// Cuts the link: sets the inside veth end down.
    pub fn link_down(&self) {
        ip(&["-n", &self.inside, "link", "set", &self.inside_dev, "down"])
            .unwrap_or_else(|e| panic!("link down: {e}"));
    }

    /// Heals the link: sets the inside veth end up again.
    pub fn link_up(&self) {
        ip(&["-n", &self.inside, "link", "set", &self.inside_dev, "up"])
            .unwrap_or_else(|e| panic!("link up: {e}"));
    }

    /// Drops every packet arriving over the veth pair, both ways, with the link up: a
    /// black hole somewhere on the path, which (unlike [`NetPair::link_down`]) neither
    /// host notices; TCP sees only loss and backs off.
    pub fn blackhole(&self) {
        for (ns, dev) in [
            (&self.inside, &self.inside_dev),
            (&self.outside, &self.outside_dev),
        ] {
            let rules = format!(
                "table inet {BLACKHOLE} {{\n chain input {{\n  type filter hook input priority -10;\n  iifname \"{dev}\" drop\n }}\n}}\n"
            );
            nft_in(ns, &rules).unwrap_or_else(|e| panic!("black hole in {ns}: {e}"));
        }
    }

    /// Ends [`NetPair::blackhole`].
    pub fn heal_blackhole(&self) {
        for ns in [&self.inside, &self.outside] {
            let mut cmd = netns_cmd(ns, "nft");
            cmd.args(["delete", "table", "inet", BLACKHOLE]);
            check(&mut cmd).unwrap_or_else(|e| panic!("heal the black hole in {ns}: {e}"));
        }
    }
}

impl Drop for NetPair {
    fn drop(&mut self) {
        for ns in self.created.drain(..) {
            kill_all_in(&ns);
            if let Err(e) = ip(&["netns", "del", &ns]) {
                eprintln!("NetPair: ip netns del {ns}: {e}");
            }
        }
    }
}

/// SIGKILLs every process in namespace `ns`, repeating until none is left (bounded).
fn kill_all_in(ns: &str) {
    for _ in 0..100 {
        let pids = match run_timeout(
            Command::new("ip").args(["netns", "pids", ns]),
            None,
            Duration::from_secs(10),
        ) {
            Ok(out) => String::from_utf8_lossy(&out.stdout).into_owned(),
            Err(_) => return,
        };
        let me = std::process::id();
        let pids: Vec<u32> = pids
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .filter(|&p| p != me)
            .collect();
        if pids.is_empty() {
            return;
        }
        for pid in pids {
            sys::kill(pid, libc::SIGKILL);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The nftables table of [`NetPair::blackhole`].
const BLACKHOLE: &str = "routy_blackhole";

/// Loads an nftables ruleset (text for `nft -f`) into namespace `ns`.
fn nft_in(ns: &str, ruleset: &str) -> Result<(), String> {
    let dir = crate::tempdir();
    let file = dir.path().join("rules.nft");
    std::fs::write(&file, ruleset).expect("write nft ruleset");
    let mut cmd = netns_cmd(ns, "nft");
    cmd.arg("-f").arg(&file);
    check(&mut cmd)
}

/// Runs `ip ARGS`, returning stderr on failure.
fn ip(args: &[&str]) -> Result<(), String> {
    check(Command::new("ip").args(args))
}

/// Runs a short command with a generous timeout, returning its output on failure.
fn check(cmd: &mut Command) -> Result<(), String> {
    let out = run_timeout(cmd, None, Duration::from_secs(30))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}: {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}
