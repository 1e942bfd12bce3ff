//! A WAN link emulator for bench/wan (this kernel has no netem): owns two TUN devices
//! and forwards every IP packet from one to the other after a token-bucket rate limit
//! with a bounded FIFO queue (tail drop, like a router's buffer), a fixed one-way
//! propagation delay, and random loss. Built by bench/wan/run.sh with plain rustc (std
//! only); not part of the cloudpdi crate.
//!
//! Usage: linkem TUN_A TUN_B RATE_MBIT DELAY_MS LOSS_PERCENT QUEUE_BYTES STATS_FILE
//!
//! The devices are created here; the caller moves each into its network namespace (the
//! open file descriptors stay attached) and configures addresses. Every second the
//! counters of both directions are written to STATS_FILE. Runs until killed.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

const TUNSETIFF: u64 = 0x4004_54ca;
const IFF_TUN: i16 = 0x0001;
const IFF_NO_PI: i16 = 0x1000;

extern "C" {
    fn ioctl(fd: i32, request: u64, ...) -> i32;
}

/// `struct ifreq` as TUNSETIFF reads it: 16-byte name, then a 24-byte union whose first
/// member here is the flags.
#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: i16,
    pad: [u8; 22],
}

fn open_tun(name: &str) -> std::io::Result<File> {
    if name.is_empty() || name.len() >= 16 {
        return Err(std::io::Error::other(format!("bad TUN name {name:?}")));
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")?;
    let mut req = IfReq {
        name: [0; 16],
        flags: IFF_TUN | IFF_NO_PI,
        pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads and writes one `struct ifreq`, which `req` is.
    let rc = unsafe { ioctl(file.as_raw_fd(), TUNSETIFF, &mut req as *mut IfReq) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(file)
}

/// Counters of one direction.
#[derive(Default)]
struct Stats {
    packets: AtomicU64,
    bytes: AtomicU64,
    lost: AtomicU64,
    queue_drops: AtomicU64,
    max_backlog: AtomicU64,
}

struct Link {
    bytes_per_sec: f64,
    delay: Duration,
    loss: f64,
    queue_bytes: f64,
}

/// xorshift64*: enough randomness for loss decisions, no dependency.
struct Rng(u64);

impl Rng {
    fn next_f64(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Reads packets from `from`, schedules each on the link (or drops it), and hands them
/// to a writer thread that delivers each into `to` at its time.
fn direction(from: Arc<File>, to: Arc<File>, link: Arc<Link>, stats: Arc<Stats>, seed: u64) {
    let (tx, rx) = mpsc::channel::<(Instant, Vec<u8>)>();
    std::thread::spawn(move || {
        for (at, packet) in rx {
            let now = Instant::now();
            if at > now {
                std::thread::sleep(at - now);
            }
            // A packet the stack refuses (e.g. the device is down) is dropped, as on a wire.
            let _ = (&*to).write(&packet);
        }
    });
    std::thread::spawn(move || {
        let mut rng = Rng(seed | 1);
        let mut buf = vec![0u8; 65536];
        // When the link has sent everything queued so far.
        let mut free_at = Instant::now();
        loop {
            let n = match (&*from).read(&mut buf) {
                Ok(n) => n,
                Err(e) => {
                    eprintln!("linkem: read: {e}");
                    std::process::exit(1);
                }
            };
            stats.packets.fetch_add(1, Ordering::Relaxed);
            if link.loss > 0.0 && rng.next_f64() < link.loss {
                stats.lost.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let now = Instant::now();
            if free_at < now {
                free_at = now;
            }
            let backlog = (free_at - now).as_secs_f64() * link.bytes_per_sec;
            if backlog + n as f64 > link.queue_bytes {
                stats.queue_drops.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            stats
                .max_backlog
                .fetch_max(backlog as u64, Ordering::Relaxed);
            stats.bytes.fetch_add(n as u64, Ordering::Relaxed);
            free_at += Duration::from_secs_f64(n as f64 / link.bytes_per_sec);
            if tx.send((free_at + link.delay, buf[..n].to_vec())).is_err() {
                std::process::exit(1);
            }
        }
    });
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 8 {
        eprintln!(
            "usage: linkem TUN_A TUN_B RATE_MBIT DELAY_MS LOSS_PERCENT QUEUE_BYTES STATS_FILE"
        );
        std::process::exit(2);
    }
    let number = |i: usize| -> f64 {
        args[i].parse().unwrap_or_else(|_| {
            eprintln!("linkem: argument {i} ({:?}) is not a number", args[i]);
            std::process::exit(2)
        })
    };
    let link = Arc::new(Link {
        bytes_per_sec: number(3) * 1e6 / 8.0,
        delay: Duration::from_secs_f64(number(4) / 1000.0),
        loss: number(5) / 100.0,
        queue_bytes: number(6),
    });
    let open = |name: &str| {
        Arc::new(open_tun(name).unwrap_or_else(|e| {
            eprintln!("linkem: TUN device {name}: {e}");
            std::process::exit(1)
        }))
    };
    let a = open(&args[1]);
    let b = open(&args[2]);
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0x9e37_79b9_7f4a_7c15);
    let ab = Arc::new(Stats::default());
    let ba = Arc::new(Stats::default());
    direction(a.clone(), b.clone(), link.clone(), ab.clone(), seed);
    direction(b, a, link, ba.clone(), seed.rotate_left(17));
    println!("ready");
    let line = |name: &str, s: &Stats| {
        format!(
            "{name} packets={} bytes={} lost={} queue_drops={} max_backlog={}\n",
            s.packets.load(Ordering::Relaxed),
            s.bytes.load(Ordering::Relaxed),
            s.lost.load(Ordering::Relaxed),
            s.queue_drops.load(Ordering::Relaxed),
            s.max_backlog.load(Ordering::Relaxed),
        )
    };
    loop {
        std::thread::sleep(Duration::from_secs(1));
        let text = line("a->b", &ab) + &line("b->a", &ba);
        let tmp = format!("{}.tmp", args[7]);
        if std::fs::write(&tmp, text).is_ok() {
            let _ = std::fs::rename(&tmp, &args[7]);
        }
    }
}
