//! The edgeview agent (the real binary) against the test dispatcher on loopback TLS (written
//! from EVE's example, `cairn_test_controller::dispatcher`) and a client that sends commands as
//! EVE's client does. The JWT is built here by hand from EVE's definitions, not with the
//! agent's own code.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test
#![allow(clippy::disallowed_methods)] // test code: blocking file work is fine here

use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use cairn_pubsub::{Bus, PublishOptions};
use cairn_test_controller::dispatcher::{Dispatcher, query, query_signed, session_hash, system};
use cairn_types::{AppInstanceStatus, EdgeviewConfig, EdgeviewStatus, EvPolicy, UUIDandVersion};
use p256::ecdsa::signature::Signer;
use p256::ecdsa::{Signature, SigningKey};

const DEVICE: &str = "6ba7b810-9dad-11d1-80b4-00c04fd430c8";
const NONCE: &str = "session-nonce-1";
const WAIT: Duration = Duration::from_secs(30);

// ---- the controller's side: a signed token ----

fn controller_key() -> (SigningKey, String) {
    use p256::pkcs8::EncodePublicKey;
    let key = SigningKey::from_slice(&[42; 32]).unwrap();
    let pem = key
        .verifying_key()
        .to_public_key_pem(p256::pkcs8::LineEnding::LF)
        .unwrap();
    (key, pem)
}

fn jwt(key: &SigningKey, dispatcher: &Dispatcher, sub: &str, exp: u64, num: u8) -> String {
    let header = URL_SAFE_NO_PAD.encode(r#"{"alg":"ES256","typ":"JWT"}"#);
    let claims = URL_SAFE_NO_PAD.encode(
        serde_json::json!({"dep": format!("{}/edge-view", dispatcher.addr), "sub": sub,
            "exp": exp, "key": NONCE, "num": num, "enc": false, "aut": 0})
        .to_string(),
    );
    let text = format!("{header}.{claims}");
    let signature: Signature = key.sign(text.as_bytes());
    format!("{text}.{}", URL_SAFE_NO_PAD.encode(signature.to_bytes()))
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

// ---- the device ----

struct Device {
    _dir: tempfile::TempDir,
    run: PathBuf,
    persist: PathBuf,
    agent: Option<Child>,
}

impl Device {
    fn new(dispatcher: &Dispatcher) -> Device {
        let dir = tempfile::tempdir().unwrap();
        let (run, persist) = (dir.path().join("run"), dir.path().join("persist"));
        // The device's root, as set-up stores it for the controller link, issued the
        // dispatcher's certificate.
        let config = persist.join("config");
        std::fs::create_dir_all(&config).unwrap();
        std::fs::create_dir_all(run.join("logs")).unwrap();
        std::fs::write(config.join("server"), "127.0.0.1:1").unwrap();
        std::fs::write(config.join("root-certificate.pem"), &dispatcher.ca_pem).unwrap();
        Device {
            _dir: dir,
            run,
            persist,
            agent: None,
        }
    }

    fn bus(&self, agent: &str) -> Bus {
        Bus::new(agent, &self.run, &self.persist)
    }

    fn start(&mut self) {
        let child = Command::new(env!("CARGO_BIN_EXE_cairn-edgeview"))
            .arg("--run-dir")
            .arg(&self.run)
            .arg("--persist-dir")
            .arg(&self.persist)
            .arg("--retry-min-ms")
            .arg("100")
            .arg("--retry-max-ms")
            .arg("500")
            .env("RUST_LOG", "info")
            .spawn()
            .unwrap();
        self.agent = Some(child);
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.agent.take() {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).unwrap();
            child.wait().unwrap();
        }
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        self.kill();
    }
}

fn config(token: String, signer: &str) -> EdgeviewConfig {
    EdgeviewConfig {
        jw_token: token,
        dev_policy: EvPolicy { enabled: true },
        signing_cert_pem: signer.to_string(),
        device_uuid: DEVICE.to_string(),
        ..Default::default()
    }
}

async fn wait_status(
    status: &mut cairn_pubsub::Subscription<EdgeviewStatus>,
    what: &str,
    done: impl Fn(&EdgeviewStatus) -> bool,
) -> EdgeviewStatus {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(value) = status.values().next()
            && done(value)
        {
            return value.clone();
        }
        assert!(
            Instant::now() < deadline,
            "{what}: the status stays {:?}",
            status.values().next()
        );
        let _ = tokio::time::timeout(Duration::from_millis(200), status.recv()).await;
    }
}

async fn wait_until(what: &str, done: impl Fn() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !done() {
        assert!(Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn app(name: &str) -> AppInstanceStatus {
    AppInstanceStatus {
        uuid_and_version: UUIDandVersion {
            uuid: "0f0e0d0c-0b0a-4908-8706-050403020100".parse().unwrap(),
            version: "1".into(),
        },
        display_name: name.into(),
        activated: true,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_eve_commands_through_the_dispatcher_and_reconnects_after_a_kill() {
    let dispatcher = Dispatcher::start().await;
    let mut device = Device::new(&dispatcher);
    let (key, signer) = controller_key();
    let token = jwt(&key, &dispatcher, DEVICE, now() + 3600, 0);
    let hash = session_hash(&token, 0);
    let configs = device
        .bus("config-agent")
        .publish::<EdgeviewConfig>(PublishOptions::for_requests())
        .await
        .unwrap();
    configs.publish(config(token, &signer)).await.unwrap();
    let apps = device
        .bus("app-manager")
        .publish::<AppInstanceStatus>(PublishOptions::default())
        .await
        .unwrap();
    apps.publish(app("web-frontend")).await.unwrap();
    let mut status = device.bus("reader").subscribe::<EdgeviewStatus>("edgeview");
    device.start();

    wait_status(&mut status, "connected", |s| s.connected == 1).await;
    let devices = dispatcher.devices();
    assert_eq!(devices.len(), 1);
    assert_eq!(devices[0].0, hash, "X-Session-Token is EVE's token hash");
    assert!(devices[0].1.ends_with("-EV-server"), "{:?}", devices[0]);
    assert_eq!(devices[0].2, "0.8.8");

    let reply = query(&dispatcher, &hash, NONCE, system("app")).await;
    assert!(reply.contains("=== System: <app> ==="), "{reply}");
    assert!(reply.contains("== app: web-frontend"), "{reply}");
    let reply = query(
        &dispatcher,
        &hash,
        NONCE,
        serde_json::json!({"version": "0.8.8", "pubsub": "zedmanager"}),
    )
    .await;
    assert!(
        reply.contains("\"DisplayName\": \"web-frontend\""),
        "{reply}"
    );
    // Read-only: a TCP tunnel is refused by name.
    let reply = query(
        &dispatcher,
        &hash,
        NONCE,
        serde_json::json!({"version": "0.8.8", "network": "tcp/localhost:22"}),
    )
    .await;
    assert!(reply.starts_with("cmd policy check failed:"), "{reply}");
    assert!(reply.contains("read-only"), "{reply}");
    // A command under another key is refused.
    let reply = query_signed(&dispatcher, &hash, "not-the-nonce", NONCE, system("app")).await;
    assert!(
        reply.contains("authentication for command failed to verify"),
        "{reply}"
    );
    assert!(!reply.contains("web-frontend"), "{reply}");
    // Counted as EVE counts: device commands that ran (not the refused tunnel or command).
    let counted = wait_status(&mut status, "commands counted", |s| s.cmd_count_dev == 2).await;
    assert!(counted.started_on.is_some() && counted.expire_on > now());

    // Killed at any point, the agent comes back to the same config and pairs again.
    device.kill();
    wait_until("the dispatcher drops the dead device", || {
        dispatcher.peers(&hash) == 0
    })
    .await;
    device.start();
    wait_until("the restarted agent reconnects", || {
        dispatcher.devices().len() == 2 && dispatcher.peers(&hash) == 1
    })
    .await;
    let reply = query(&dispatcher, &hash, NONCE, system("app")).await;
    assert!(reply.contains("== app: web-frontend"), "{reply}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_multi_instance_token_runs_one_session_per_instance() {
    let dispatcher = Dispatcher::start().await;
    let mut device = Device::new(&dispatcher);
    let (key, signer) = controller_key();
    let token = jwt(&key, &dispatcher, DEVICE, now() + 3600, 2);
    let configs = device
        .bus("config-agent")
        .publish::<EdgeviewConfig>(PublishOptions::for_requests())
        .await
        .unwrap();
    configs
        .publish(config(token.clone(), &signer))
        .await
        .unwrap();
    let mut status = device.bus("reader").subscribe::<EdgeviewStatus>("edgeview");
    device.start();
    wait_status(&mut status, "both instances up", |s| {
        s.connected == 2 && s.instances == 2
    })
    .await;
    let mut hostnames: Vec<String> = dispatcher.devices().into_iter().map(|d| d.1).collect();
    hostnames.sort();
    assert!(hostnames[0].ends_with("-inst-1-EV-server"), "{hostnames:?}");
    assert!(hostnames[1].ends_with("-inst-2-EV-server"), "{hostnames:?}");
    let reply = query(
        &dispatcher,
        &session_hash(&token, 2),
        NONCE,
        system("volume"),
    )
    .await;
    assert!(reply.contains("=== System: <volume> ==="), "{reply}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tokens_are_refused_by_name_and_never_reach_the_dispatcher() {
    let dispatcher = Dispatcher::start().await;
    let mut device = Device::new(&dispatcher);
    let (key, signer) = controller_key();
    let (stranger, _) = {
        let k = SigningKey::from_slice(&[7; 32]).unwrap();
        (k, ())
    };
    let configs = device
        .bus("config-agent")
        .publish::<EdgeviewConfig>(PublishOptions::for_requests())
        .await
        .unwrap();
    let mut status = device.bus("reader").subscribe::<EdgeviewStatus>("edgeview");
    let cases = [
        (
            jwt(&key, &dispatcher, DEVICE, now() - 60, 0),
            "the edgeview token expired",
        ),
        (
            jwt(&stranger, &dispatcher, DEVICE, now() + 3600, 0),
            "signature does not verify",
        ),
        (
            jwt(
                &key,
                &dispatcher,
                "00000000-0000-4000-8000-000000000001",
                now() + 3600,
                0,
            ),
            "is for device \"00000000-0000-4000-8000-000000000001\", not this device",
        ),
        (
            jwt(&key, &dispatcher, DEVICE, now() + 3600, 6),
            "asks for 6 instances; at most 5",
        ),
    ];
    configs
        .publish(config(cases[0].0.clone(), &signer))
        .await
        .unwrap();
    device.start();
    for (i, (token, fault)) in cases.iter().enumerate() {
        let mut cfg = config(token.clone(), &signer);
        cfg.gen_id = i as u32;
        configs.publish(cfg).await.unwrap();
        let refused = wait_status(&mut status, fault, |s| s.last_error.contains(fault)).await;
        assert_eq!(refused.connected, 0);
        assert_eq!(refused.expire_on, 0, "no token in force");
    }
    // The fault is the agent's log too (which the log-manager ships to the controller).
    assert!(dispatcher.devices().is_empty(), "no refused token was used");
    // A good token after the bad ones is taken.
    configs
        .publish(config(
            jwt(&key, &dispatcher, DEVICE, now() + 3600, 0),
            &signer,
        ))
        .await
        .unwrap();
    wait_status(&mut status, "connected", |s| {
        s.connected == 1 && s.last_error.is_empty()
    })
    .await;
}
