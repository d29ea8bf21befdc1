//! Reaching the builder: the host and port ssh really uses (`ssh -G`), and whether an SSH
//! server answers there (`tcp`).

use std::io::Read;
use std::net::{TcpStream, ToSocketAddrs};
use std::process::{Command, Stdio};

use nixpool_api::machines::StoreUri;

use super::process::output_within;
use super::{Check, CheckId, Options};

/// Host name and port ssh really uses (`ssh -G` applies ssh_config).
pub(super) fn resolve(opts: &Options, uri: &StoreUri) -> (String, u16) {
    let mut cmd = Command::new(&opts.ssh);
    cmd.arg("-G");
    if let Some(p) = uri.port {
        cmd.args(["-p", &p.to_string()]);
    }
    cmd.arg(uri.destination());
    let fallback = (uri.host.clone(), uri.port.unwrap_or(22));
    let Ok(out) = output_within(cmd.stdin(Stdio::null()), opts.remaining()) else {
        return fallback;
    };
    host_and_port(&String::from_utf8_lossy(&out.stdout), fallback)
}

/// `hostname` and `port` from `ssh -G` output; what it does not say stays `fallback`.
fn host_and_port(ssh_g: &str, fallback: (String, u16)) -> (String, u16) {
    let (mut host, mut port) = fallback;
    for line in ssh_g.lines() {
        if let Some(h) = line.strip_prefix("hostname ") {
            host = h.trim().to_string();
        } else if let Some(p) = line.strip_prefix("port ") {
            port = p.trim().parse().unwrap_or(port);
        }
    }
    (host, port)
}

pub(super) fn check_tcp(opts: &Options, host: &str, port: u16, subject: Option<&str>) -> Check {
    let id = CheckId::Tcp;
    let fix = "check the pool is Ready (`builderctl status`) and that this machine reaches its Service: a ClusterIP needs the cluster network (VPN), a LoadBalancer its source ranges, a firewall the port";
    // Name resolution cannot be given a timeout; it runs aside and is given up on in time.
    let (tx, rx) = std::sync::mpsc::channel();
    let name = host.to_string();
    std::thread::spawn(move || {
        let _ = tx.send((name.as_str(), port).to_socket_addrs().map(|a| a.collect::<Vec<_>>()));
    });
    let resolved = match rx.recv_timeout(opts.remaining()) {
        Ok(r) => r,
        Err(_) => return opts.timed_out(id, subject, &format!("resolving {host}")),
    };
    let addrs: Vec<_> = match resolved {
        Ok(a) => a,
        Err(e) => {
            return Check::fail(id, subject, format!("cannot resolve {host}: {e}"))
                .with_fix("check the name in status.endpoint (spec.service.externalHost) and your DNS");
        }
    };
    let mut last = String::new();
    for a in &addrs {
        let left = opts.remaining();
        if left.is_zero() {
            return opts.timed_out(id, subject, &format!("connecting to {host}:{port}"));
        }
        let wait = opts.connect_timeout.min(left);
        match TcpStream::connect_timeout(a, wait) {
            Ok(mut s) => {
                let _ = s.set_read_timeout(Some(wait));
                let mut buf = [0u8; 64];
                let n = s.read(&mut buf).unwrap_or(0);
                let banner = String::from_utf8_lossy(&buf[..n])
                    .lines()
                    .next()
                    .unwrap_or("")
                    .to_string();
                if banner.starts_with("SSH-") {
                    return Check::pass(id, subject, format!("{host}:{port} answers: {banner}"));
                }
                return Check::fail(
                    id,
                    subject,
                    format!("{host}:{port} accepts connections but does not speak SSH (it sent {banner:?})"),
                )
                .with_fix("the endpoint points at something else: check status.endpoint and the Service's port");
            }
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                last = format!("nothing is listening on {host}:{port} (connection refused)");
            }
            Err(e)
                if (e.kind() == std::io::ErrorKind::TimedOut || e.kind() == std::io::ErrorKind::WouldBlock)
                    && wait < opts.connect_timeout =>
            {
                return opts.timed_out(id, subject, &format!("connecting to {host}:{port}"));
            }
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut || e.kind() == std::io::ErrorKind::WouldBlock => {
                last = format!(
                    "{host}:{port} does not answer within {:?} (a firewall or no route)",
                    opts.connect_timeout
                );
            }
            Err(e) => last = format!("{host}:{port}: {e}"),
        }
    }
    Check::fail(id, subject, last).with_fix(fix)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ssh_g_output_names_the_real_host_and_port() {
        let out = "user builder\nhostname 192.0.2.10\nport 2222\nhostkeyalias nixpool-builds-linux\n";
        assert_eq!(host_and_port(out, ("alias".into(), 22)), ("192.0.2.10".into(), 2222));
        // Nothing said, or a port that is no number: the URI's own.
        assert_eq!(host_and_port("", ("h".into(), 2200)), ("h".into(), 2200));
        assert_eq!(host_and_port("port x\n", ("h".into(), 2200)), ("h".into(), 2200));
        // `hostkeyalias` does not count as `hostname`.
        assert_eq!(host_and_port("hostkeyalias a\n", ("h".into(), 22)), ("h".into(), 22));
    }
}
