//! Traffic for the forwarding benchmark (`bench/forwarding.sh`): a TCP
//! connection-rate client and its server, a small-packet UDP sender and its
//! counter. std only; every mode is bounded in time.
//!
//!   netload tcp-serve PORT SECONDS
//!   netload tcp-connect ADDR:PORT SECONDS      -> prints connections per second
//!   netload udp-count PORT SECONDS             -> prints packets received
//!   netload udp-send ADDR:PORT SECONDS SIZE    -> prints packets sent

use std::io::Read;
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

fn arg(n: usize) -> String {
    std::env::args().nth(n).unwrap_or_else(|| {
        eprintln!("usage: see the header of examples/netload.rs");
        std::process::exit(2)
    })
}

fn seconds(n: usize) -> Duration {
    Duration::from_secs_f64(arg(n).parse().expect("SECONDS is a number"))
}

fn main() {
    match arg(1).as_str() {
        "tcp-serve" => {
            let listener = TcpListener::bind(("0.0.0.0", arg(2).parse::<u16>().unwrap())).unwrap();
            listener.set_nonblocking(true).unwrap();
            let deadline = Instant::now() + seconds(3);
            while Instant::now() < deadline {
                match listener.accept() {
                    // Closing first puts TIME_WAIT on this side, so the
                    // client never runs out of ephemeral ports.
                    Ok((stream, _)) => drop(stream),
                    Err(_) => std::thread::sleep(Duration::from_micros(50)),
                }
            }
        }
        "tcp-connect" => {
            let addr: SocketAddr = arg(2).parse().unwrap();
            let window = seconds(3);
            let start = Instant::now();
            let (mut ok, mut failed) = (0u64, 0u64);
            let mut buf = [0u8; 16];
            while start.elapsed() < window {
                match TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
                    Ok(mut s) => {
                        // Wait for the server's close: the connection is
                        // then complete in both directions.
                        let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
                        let _ = s.read(&mut buf);
                        ok += 1;
                    }
                    Err(_) => failed += 1,
                }
            }
            println!("{:.0} {failed}", ok as f64 / start.elapsed().as_secs_f64());
        }
        "udp-count" => {
            let socket = UdpSocket::bind(("0.0.0.0", arg(2).parse::<u16>().unwrap())).unwrap();
            socket
                .set_read_timeout(Some(Duration::from_millis(100)))
                .unwrap();
            let deadline = Instant::now() + seconds(3);
            let (mut count, mut buf) = (0u64, [0u8; 2048]);
            while Instant::now() < deadline {
                if socket.recv(&mut buf).is_ok() {
                    count += 1;
                }
            }
            println!("{count}");
        }
        "udp-send" => {
            let socket = UdpSocket::bind("0.0.0.0:0").unwrap();
            socket
                .connect(arg(2).parse::<SocketAddr>().unwrap())
                .unwrap();
            let window = seconds(3);
            let payload = vec![0u8; arg(4).parse().unwrap()];
            let start = Instant::now();
            let mut sent = 0u64;
            while start.elapsed() < window {
                if socket.send(&payload).is_ok() {
                    sent += 1;
                }
            }
            println!("{sent}");
        }
        other => {
            eprintln!("unknown mode {other}");
            std::process::exit(2)
        }
    }
}
