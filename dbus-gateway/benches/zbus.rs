//! The cost of the D-Bus read-out's transport: a zbus method round trip over a private
//! dbus-daemon (p50/p99 of 2,000). `cargo bench -p cairn-dbus --bench zbus`. Prints; timing
//! never fails the run.

#![allow(clippy::unwrap_used)] // a benchmark that cannot set up has nothing to report

#[path = "../tests/support/dbus_daemon.rs"]
mod dbus_daemon;
#[path = "zbus_rtt.rs"]
mod zbus_rtt;

use std::time::Duration;

fn percentile(samples: &mut [Duration], p: f64) -> Duration {
    samples.sort();
    samples[((samples.len() as f64 - 1.0) * p).round() as usize]
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn main() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut rtt = runtime.block_on(zbus_rtt::zbus_round_trips(2000));
    println!(
        "zbus method round trip over a private dbus-daemon: p50 {:.1} µs, p99 {:.1} µs",
        us(percentile(&mut rtt, 0.5)),
        us(percentile(&mut rtt, 0.99))
    );
}
