//! zbus round trip on a private dbus-daemon: one connection serves `Echo(s) -> s`, another calls
//! it, through the daemon, as `busctl` or a technician's tool would reach the gateway.
//!
//! A module, not a bench target: the includer also includes `tests/support/dbus_daemon.rs` as
//! `crate::dbus_daemon` (the `zbus` bench, and the D-Bus tests for a smoke run).

use std::pin::Pin;
use std::time::{Duration, Instant};

use futures_core::Stream;
use zbus::message::Type as MessageType;
use zbus::{Connection, MatchRule, Message, MessageStream};

use crate::dbus_daemon::PrivateDbusDaemon;

const SERVICE: &str = "org.cairn.EchoBench";
const PATH: &str = "/org/cairn/EchoBench";
const INTERFACE: &str = "org.cairn.Echo1";
const PAYLOAD: usize = 256;

/// Times `rounds` calls of `Echo` with a 256-byte string, each from sending the call to
/// receiving the reply. Panics on any D-Bus failure: this is a benchmark.
pub async fn zbus_round_trips(rounds: usize) -> Vec<Duration> {
    let daemon = PrivateDbusDaemon::start();
    let server = connect(daemon.address()).await;
    let rule = MatchRule::builder()
        .msg_type(MessageType::MethodCall)
        .interface(INTERFACE)
        .member("Echo")
        .build()
        .expect("echo match rule");
    let calls = MessageStream::for_match_rule(rule, &server, None)
        .await
        .expect("echo call stream");
    let echo = tokio::spawn(serve_echo(server.clone(), calls));
    server
        .request_name(SERVICE)
        .await
        .expect("own the echo name");

    let client = connect(daemon.address()).await;
    let payload = "x".repeat(PAYLOAD);
    let mut times = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let start = Instant::now();
        let reply = client
            .call_method(
                Some(SERVICE),
                PATH,
                Some(INTERFACE),
                "Echo",
                &(payload.as_str(),),
            )
            .await
            .expect("echo reply");
        times.push(start.elapsed());
        let echoed: String = reply.body().deserialize().expect("echo reply is a string");
        assert_eq!(echoed.len(), PAYLOAD);
    }
    echo.abort();
    drop(daemon);
    times
}

async fn connect(address: &str) -> Connection {
    zbus::connection::Builder::address(address)
        .build()
        .await
        .expect("connect to the private bus")
}

async fn serve_echo(conn: Connection, mut calls: MessageStream) {
    while let Some(Ok(call)) = std::future::poll_fn(|cx| Pin::new(&mut calls).poll_next(cx)).await {
        let header = call.header();
        let reply = call
            .body()
            .deserialize::<String>()
            .and_then(|text| Message::method_return(&header).build(&(text,)));
        match reply {
            Ok(reply) => {
                if conn.send(&reply).await.is_err() {
                    return;
                }
            }
            Err(e) => eprintln!("echo: bad call: {e}"),
        }
    }
}
