//! The `conntrack` tool (conntrack-tools) and the host's addresses: what
//! revocation needs to find and delete connections (see `crate::revoke`).

use super::process::{find_program, run_with_timeout};
use crate::revoke::{Flow, Interfaces};
use anyhow::Context;
use serde::Deserialize;
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

pub struct Conntrack {
    program: PathBuf,
    timeout: Duration,
}

impl Conntrack {
    /// `None` when conntrack-tools is not installed.
    pub fn find(timeout: Duration) -> Option<Conntrack> {
        find_program("conntrack").map(|program| Conntrack { program, timeout })
    }

    /// Every tracked connection, IPv4 and IPv6 (its original direction).
    pub fn flows(&self) -> anyhow::Result<Vec<Flow>> {
        let mut flows = Vec::new();
        for family in ["ipv4", "ipv6"] {
            let mut cmd = Command::new(&self.program);
            cmd.args(["-L", "-f", family]);
            let out = run_with_timeout(cmd, None, self.timeout)
                .with_context(|| format!("conntrack -L -f {family}"))?;
            flows.extend(out.lines().filter_map(parse_flow));
        }
        Ok(flows)
    }

    /// Deletes the entries of one connection (by its original tuple).
    pub fn delete(&self, flow: &Flow) -> anyhow::Result<()> {
        let mut cmd = Command::new(&self.program);
        let family = if flow.src.is_ipv4() { "ipv4" } else { "ipv6" };
        cmd.args(["-D", "-f", family, "-p", &flow.proto.to_string()])
            .args(["-s", &flow.src.to_string(), "-d", &flow.dst.to_string()]);
        if let (Some(sport), Some(dport)) = (flow.sport, flow.dport) {
            cmd.args(["--sport", &sport.to_string(), "--dport", &dport.to_string()]);
        }
        match run_with_timeout(cmd, None, self.timeout) {
            Ok(_) => Ok(()),
            // Gone in the meantime (it ended, or timed out): nothing to cut.
            Err(err) if err.to_string().contains("0 flow entries") => Ok(()),
            Err(err) => Err(err).context("conntrack -D"),
        }
    }
}

/// One line of `conntrack -L`: `udp 17 29 src=A dst=B sport=1 dport=2 ...`
/// (the first src/dst/sport/dport are the original direction, the second
/// the reply's: not the original reversed when the flow was NATed).
fn parse_flow(line: &str) -> Option<Flow> {
    let mut words = line.split_whitespace();
    words.next()?;
    let proto: u8 = words.next()?.parse().ok()?;
    let all = |key: &'static str| {
        line.split_whitespace()
            .filter_map(move |w| w.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
    };
    let first = |key: &'static str| all(key).next();
    let reply = |key: &'static str| all(key).nth(1);
    let nat = reply("src").is_some_and(|r| Some(r) != first("dst"))
        || reply("dst").is_some_and(|r| Some(r) != first("src"))
        || reply("sport").is_some_and(|r| Some(r) != first("dport"))
        || reply("dport").is_some_and(|r| Some(r) != first("sport"));
    Some(Flow {
        nat,
        proto,
        src: first("src")?.parse().ok()?,
        dst: first("dst")?.parse().ok()?,
        sport: first("sport").and_then(|p| p.parse().ok()),
        dport: first("dport").and_then(|p| p.parse().ok()),
    })
}

/// The host's interfaces and subnets (`ip -j addr show`).
pub fn interfaces(timeout: Duration) -> anyhow::Result<Interfaces> {
    #[derive(Deserialize)]
    struct Link {
        ifname: String,
        #[serde(default)]
        addr_info: Vec<Addr>,
    }
    #[derive(Deserialize)]
    struct Addr {
        local: Option<IpAddr>,
        prefixlen: Option<u8>,
    }
    let ip = find_program("ip").context("`ip` (iproute2) is needed to place connections")?;
    let mut cmd = Command::new(ip);
    cmd.args(["-j", "addr", "show"]);
    let out = run_with_timeout(cmd, None, timeout).context("ip -j addr show")?;
    let links: Vec<Link> = serde_json::from_str(&out).context("ip printed invalid JSON")?;
    Ok(Interfaces {
        addresses: links
            .into_iter()
            .flat_map(|link| {
                let name = link.ifname;
                link.addr_info.into_iter().filter_map(move |a| {
                    let net = ipnet::IpNet::new(a.local?, a.prefixlen?).ok()?;
                    Some((name.clone(), net))
                })
            })
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conntrack_lines_give_the_original_tuple() {
        let line = "udp      17 29 src=10.231.1.2 dst=10.231.2.2 sport=40000 dport=5001 [UNREPLIED] src=10.231.2.2 dst=10.231.1.2 sport=5001 dport=40000 mark=0 use=1";
        let flow = parse_flow(line).unwrap();
        assert_eq!(flow.proto, 17);
        assert_eq!(flow.src.to_string(), "10.231.1.2");
        assert_eq!((flow.sport, flow.dport), (Some(40000), Some(5001)));
        assert!(!flow.nat);
        let dnat = "tcp      6 117 SYN_SENT src=10.231.1.2 dst=10.231.1.1 sport=40000 dport=80 [UNREPLIED] src=10.231.2.2 dst=10.231.1.2 sport=8080 dport=40000 mark=0 use=1";
        assert!(parse_flow(dnat).unwrap().nat);
        let masq = "tcp      6 117 SYN_SENT src=10.231.1.2 dst=192.0.2.9 sport=40000 dport=443 [UNREPLIED] src=192.0.2.9 dst=192.0.2.5 sport=443 dport=40000 mark=0 use=1";
        assert!(parse_flow(masq).unwrap().nat);
        let icmp = "icmp     1 29 src=10.0.0.1 dst=10.0.0.2 type=8 code=0 id=7 src=10.0.0.2 dst=10.0.0.1 type=0 code=0 id=7 mark=0 use=1";
        assert_eq!(parse_flow(icmp).unwrap().dport, None);
        assert!(parse_flow("conntrack v1.4.7 (conntrack-tools): 0 flow entries").is_none());
    }
}
