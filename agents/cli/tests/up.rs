//! `cairn up` as a user runs it: the real agents under a temporary root, a killed agent
//! restarted by the supervisor, SIGTERM stopping agents and apps, and the config source flags.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test
#![allow(clippy::disallowed_methods)] // test code: blocking file work is fine here

mod common;

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

#[test]
fn up_runs_the_demo_restarts_a_killed_agent_and_stops_everything_on_sigterm() {
    let mut up = Up::start(&[]);
    let view = up.wait_status(Duration::from_secs(30), |v| {
        demo_ready(v) && AGENTS.iter().all(|a| agent_state(v, a) == "up")
    });
    let app_pid = view["domains"]
        .as_array()
        .and_then(|d| d.iter().find(|d| d["UUIDandVersion"]["UUID"] == DEMO_APP))
        .and_then(|d| d["Pid"].as_i64())
        .expect("the demo app's domain reports its pid") as i32;
    assert!(alive(app_pid), "the demo app process {app_pid} runs");
    let first = up.agent_pids();
    assert_eq!(
        first.len(),
        AGENTS.len(),
        "every agent under cairn up: {first:?}"
    );

    // The supervisor restarts an agent that dies.
    let killed = first["volume-manager"];
    kill(Pid::from_raw(killed), Signal::SIGKILL).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let restarted = loop {
        if let Some(&pid) = up.agent_pids().get("volume-manager")
            && pid != killed
        {
            break pid;
        }
        assert!(
            Instant::now() < deadline,
            "volume-manager not restarted within 10 s\n{}",
            up.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(!alive(killed));
    up.wait_status(Duration::from_secs(10), |v| {
        agent_state(v, "volume-manager") == "up" && demo_ready(v)
    });
    assert!(
        up.log()
            .contains("[volume-manager] exited (signal: 9 (SIGKILL))"),
        "the supervisor says why it restarts:\n{}",
        up.log()
    );

    let status = up.stop(Signal::SIGTERM, Duration::from_secs(60));
    assert!(status.success(), "cairn up exits cleanly: {status:?}");
    let mut all: Vec<i32> = first.values().copied().collect();
    all.push(restarted);
    for pid in all {
        assert!(!alive(pid), "agent {pid} still runs after cairn up ended");
    }
    assert!(!alive(app_pid), "the app process {app_pid} still runs");
    assert_eq!(
        processes_mentioning(up.path()),
        Vec::<i32>::new(),
        "no process of this device is left"
    );
    let (code, _, err) = up.cairn(&["status"]);
    assert_eq!(code, 3, "{err}");
}

#[test]
fn up_with_config_runs_that_file() {
    let root = tempfile::tempdir().unwrap();
    let config = root.path().join("mine.json");
    let app_id = "0000000a-0000-4000-8000-0000000000c1";
    std::fs::write(
        &config,
        process_app_config(app_id, "custom-sensor", "7", &[]),
    )
    .unwrap();
    let mut up = Up::start_in(root, &cairn_bin(), &["--config", config.to_str().unwrap()]);
    let view = up.wait_status(Duration::from_secs(30), |v| {
        app(v, "custom-sensor").is_some_and(|a| a["State"] == RUNNING)
    });
    assert!(
        app(&view, "demo-logger").is_none(),
        "the demo config is not used"
    );
    assert_eq!(view["apps"][0]["UUIDandVersion"]["Version"], "7");
    assert_eq!(
        view["device"]["ConfigSource"]["Path"],
        config.to_str().unwrap(),
        "{view}"
    );
    assert!(
        !up.path().join("config.json").exists(),
        "no demo config written"
    );
    let status = up.stop(Signal::SIGTERM, Duration::from_secs(60));
    assert!(status.success(), "{status:?}");
}

#[test]
fn config_and_controller_are_mutually_exclusive() {
    let root = tempfile::tempdir().unwrap();
    let (code, _, err) = cairn(
        root.path(),
        &["up", "--config", "x.json", "--controller", "https://c"],
    );
    assert_eq!(code, 2);
    assert!(err.contains("cannot be used with"), "{err}");
    let (code, _, err) = cairn(root.path(), &["up", "--serial", "S1"]);
    assert_eq!(code, 2, "--serial needs --controller: {err}");
    assert!(err.contains("--controller"), "{err}");
}

/// The config-agent's controller flags are being written elsewhere; what `up` owes is passing
/// them through unchanged, checked here with stand-in agent executables that record their
/// arguments (the real `cairn` binary, copied next to them, is what runs).
#[test]
fn up_passes_the_controller_flags_to_the_config_agent_only() {
    let root = tempfile::tempdir().unwrap();
    let bin = root.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    let cairn = bin.join("cairn");
    std::fs::copy(cairn_bin(), &cairn).unwrap();
    for agent in AGENTS {
        let stub = bin.join(format!("cairn-{agent}"));
        std::fs::write(
            &stub,
            format!(
                "#!/bin/sh\nprintf '%s\\n' \"$@\" > \"{}/args-{agent}.tmp\"\nmv \"{}/args-{agent}.tmp\" \"{}/args-{agent}\"\nexec sleep 300\n",
                root.path().display(),
                root.path().display(),
                root.path().display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&stub, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let cert = root.path().join("onboard.cert.pem");
    let key = root.path().join("onboard.key.pem");
    let ca = root.path().join("root.pem");
    std::fs::write(&cert, "cert").unwrap();
    std::fs::write(&key, "key").unwrap();
    std::fs::write(&ca, "root").unwrap();
    let path = root.path().to_path_buf();
    let mut up = Up::start_in(
        root,
        &cairn,
        &[
            "--controller",
            "https://controller.example:8443",
            "--onboard-cert",
            cert.to_str().unwrap(),
            "--onboard-key",
            key.to_str().unwrap(),
            "--serial",
            "SN-0042",
            "--root-cert",
            ca.to_str().unwrap(),
        ],
    );
    let args = |agent: &str| -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(text) = std::fs::read_to_string(path.join(format!("args-{agent}"))) {
                return text.lines().map(str::to_string).collect();
            }
            assert!(
                Instant::now() < deadline,
                "{agent} not started\n{}",
                up.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    assert_eq!(
        args("config-agent"),
        [
            "--controller",
            "https://controller.example:8443",
            "--onboard-cert",
            cert.to_str().unwrap(),
            "--onboard-key",
            key.to_str().unwrap(),
            "--serial",
            "SN-0042",
            "--root-cert",
            ca.to_str().unwrap(),
        ]
    );
    assert!(
        !path.join("config.json").exists(),
        "no demo config with a controller"
    );
    for agent in ["app-manager", "volume-manager", "domain-manager"] {
        let args = args(agent);
        assert!(
            !args.iter().any(|a| a.starts_with("--controller")
                || a.starts_with("--onboard")
                || a == "--serial"),
            "{agent} got {args:?}"
        );
    }
    let status = up.stop(Signal::SIGTERM, Duration::from_secs(20));
    assert!(status.success(), "{status:?}");
}

#[test]
fn up_names_a_missing_onboarding_file() {
    let root = tempfile::tempdir().unwrap();
    let missing = root.path().join("nope.pem");
    let key = root.path().join("key.pem");
    std::fs::write(&key, "key").unwrap();
    let (code, _, err) = cairn(
        root.path(),
        &[
            "up",
            "--controller",
            "https://c",
            "--onboard-cert",
            missing.to_str().unwrap(),
            "--onboard-key",
            key.to_str().unwrap(),
        ],
    );
    assert_eq!(code, 2);
    assert!(
        err.contains("onboarding certificate") && err.contains("nope.pem"),
        "{err}"
    );
    let (code, _, err) = cairn(
        root.path(),
        &[
            "up",
            "--controller",
            "https://c",
            "--onboard-key",
            key.to_str().unwrap(),
        ],
    );
    assert_eq!(code, 2, "a key without its certificate: {err}");
    assert!(err.contains("--onboard-cert"), "{err}");
}

/// With the real config-agent: the controller set-up reaches it (it keeps what it is given
/// under <persist>/config/ before anything else), and a later `cairn up` with no source follows
/// that controller instead of starting the demo.
#[test]
fn the_real_config_agent_receives_the_controller_setup_and_keeps_it() {
    let root = tempfile::tempdir().unwrap();
    let given = |name: &str, text: &str| {
        let path = root.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    let cert = given(
        "my-onboard.pem",
        "-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n",
    );
    let key = given(
        "my-onboard.key",
        "-----BEGIN PRIVATE KEY-----\n-----END PRIVATE KEY-----\n",
    );
    let ca = given(
        "my-root.pem",
        "-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n",
    );
    let config_dir = root.path().join("persist/config");
    let mut up = Up::start_in(
        root,
        &cairn_bin(),
        &[
            "--controller",
            "https://127.0.0.1:9",
            "--onboard-cert",
            cert.to_str().unwrap(),
            "--onboard-key",
            key.to_str().unwrap(),
            "--serial",
            "SN-REAL-7",
            "--root-cert",
            ca.to_str().unwrap(),
        ],
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    let read = |name: &str| std::fs::read_to_string(config_dir.join(name)).unwrap_or_default();
    // The files are written one by one (server first, the onboarding key last): wait for all.
    let onboard = std::fs::read_to_string(&cert).unwrap();
    while read("serial").trim() != "SN-REAL-7"
        || read("server").trim() != "127.0.0.1:9"
        || read("onboard.cert.pem") != onboard
        || read("onboard.key.pem").is_empty()
    {
        assert!(
            Instant::now() < deadline,
            "the config-agent did not store the controller set-up\n{}",
            up.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        read("onboard.cert.pem"),
        std::fs::read_to_string(&cert).unwrap()
    );
    assert!(!up.path().join("config.json").exists(), "no demo config");
    assert!(up.stop(Signal::SIGTERM, Duration::from_secs(30)).success());

    // Again with no source: the config-agent gets no --config, the demo is not written.
    let root = std::mem::replace(&mut up.root, tempfile::tempdir().unwrap());
    drop(up);
    let mut again = Up::start_in(root, &cairn_bin(), &[]);
    let deadline = Instant::now() + Duration::from_secs(10);
    let args = loop {
        if let Some(&pid) = again.agent_pids().get("config-agent") {
            break cmdline(pid);
        }
        assert!(
            Instant::now() < deadline,
            "no config-agent\n{}",
            again.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(!args.iter().any(|a| a == "--config"), "{args:?}");
    assert!(!again.path().join("config.json").exists(), "no demo config");
    assert!(
        again
            .stop(Signal::SIGTERM, Duration::from_secs(30))
            .success()
    );
}

/// The agents of a `cairn up` killed with SIGKILL die with it (parent-death signal); a new
/// `cairn up` on the same root then runs exactly one set of agents, all `up`.
#[test]
fn a_sigkilled_up_takes_its_agents_along_and_the_next_up_runs_one_set() {
    let mut up = Up::start(&[]);
    let view = up.wait_status(Duration::from_secs(30), |v| {
        demo_ready(v) && AGENTS.iter().all(|a| agent_state(v, a) == "up")
    });
    let app_pid = view["domains"]
        .as_array()
        .and_then(|d| d.iter().find(|d| d["UUIDandVersion"]["UUID"] == DEMO_APP))
        .and_then(|d| d["Pid"].as_i64())
        .expect("the demo app's domain reports its pid") as i32;
    let first: Vec<i32> = up.agent_pids().values().copied().collect();
    assert_eq!(first.len(), AGENTS.len(), "{first:?}");
    up.stop(Signal::SIGKILL, Duration::from_secs(10));
    wait_gone(
        &first,
        Duration::from_secs(10),
        "agents of the killed cairn up",
    );
    // The agents got SIGKILL: the app runs on, to be re-adopted.
    assert!(alive(app_pid), "the demo app runs on");

    let root = std::mem::replace(&mut up.root, tempfile::tempdir().unwrap());
    drop(up);
    let again = Up::start_in(root, &cairn_bin(), &[]);
    again.wait_status(Duration::from_secs(30), |v| {
        demo_ready(v) && AGENTS.iter().all(|a| agent_state(v, a) == "up")
    });
    let agents = agent_processes(again.path());
    let mut names: Vec<&str> = agents.iter().map(|(a, _)| a.as_str()).collect();
    names.sort();
    let mut expected = AGENTS.to_vec();
    expected.sort();
    assert_eq!(names, expected, "exactly one set of agents: {agents:?}");
    let children = again.agent_pids();
    assert!(
        agents.iter().all(|(a, pid)| children.get(a) == Some(pid)),
        "every agent is a child of the new cairn up: {agents:?} vs {children:?}"
    );
    let apps = app_processes(again.path());
    assert_eq!(
        apps,
        [app_pid],
        "the demo app was re-adopted, not started twice: {:?}\n{}",
        apps.iter().map(|p| cmdline(*p)).collect::<Vec<_>>(),
        again.log()
    );
    assert!(
        !again.log().contains("already published"),
        "no agent met a stale publisher:\n{}",
        again.log()
    );
}

/// A second `cairn up` on the same root refuses at once, naming the first one's pid, and the
/// first one's agents are untouched.
#[test]
fn a_second_up_on_the_same_root_is_refused_naming_the_first() {
    let up = Up::start(&[]);
    up.wait_status(Duration::from_secs(30), |v| {
        AGENTS.iter().all(|a| agent_state(v, a) == "up")
    });
    let before = up.agent_pids();
    let mut second = Command::new(cairn_bin())
        .arg("--root")
        .arg(up.path())
        .arg("up")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status = wait_exit(&mut second, Duration::from_secs(10));
    let mut err = String::new();
    second
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert_eq!(status.code(), Some(2), "{err}");
    assert!(
        err.contains("already supervises") && err.contains(&format!("pid {}", up.pid())),
        "the refusal names the running cairn up: {err}"
    );
    assert_eq!(
        up.agent_pids(),
        before,
        "the first one's agents are untouched"
    );
    assert_eq!(agent_processes(up.path()).len(), AGENTS.len());
}

/// A child of the test that is killed and reaped when the test ends, failed or not.
struct Reaped(std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Start time of `pid` (/proc/<pid>/stat field 22), as `cairn up` records it.
fn start_time(pid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let (_, rest) = stat.rsplit_once(')').unwrap();
    rest.split_whitespace().nth(19).unwrap().parse().unwrap()
}

/// Agents left by a supervisor that died in a way their parent-death signal does not cover
/// (here: started directly, one recorded in the pid file of a dead `cairn up`, one found only
/// by the topic lock it holds): the read-out does not call them `up`, and the next `cairn up`
/// stops them before it starts its own.
#[test]
fn orphans_of_a_dead_supervisor_are_shown_as_such_and_stopped_before_new_agents_start() {
    let root = tempfile::tempdir().unwrap();
    let (run, persist) = (root.path().join("run"), root.path().join("persist"));
    std::fs::create_dir_all(run.join("agents")).unwrap();
    let orphan = |agent: &str| {
        let log = std::fs::File::create(root.path().join(format!("orphan-{agent}.log"))).unwrap();
        Reaped(
            Command::new(agent_bin(agent))
                .env("CAIRN_RUN_DIR", &run)
                .env("CAIRN_PERSIST_DIR", &persist)
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .unwrap(),
        )
    };
    let mut recorded = orphan("volume-manager");
    let mut unrecorded = orphan("app-manager");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !run.join("volume-manager/VolumeStatus.sock").exists()
        || !run.join("app-manager/AppInstanceStatus.sock").exists()
    {
        assert!(Instant::now() < deadline, "the orphans did not publish");
        std::thread::sleep(Duration::from_millis(50));
    }
    let (recorded_pid, unrecorded_pid) = (recorded.0.id() as i32, unrecorded.0.id() as i32);
    std::fs::write(
        run.join("agents/volume-manager.pid"),
        format!("{recorded_pid} {}\n", start_time(recorded_pid)),
    )
    .unwrap();
    // The supervisor that recorded it is gone: a pid that ran and ended.
    let mut gone = Command::new("true").spawn().unwrap();
    let gone_pid = gone.id();
    gone.wait().unwrap();
    std::fs::write(run.join("cairn-up.lock"), format!("{gone_pid} 1\n")).unwrap();

    let (code, out, err) = cairn(root.path(), &["status", "--json"]);
    assert_eq!(code, 0, "{err}");
    let view: serde_json::Value = serde_json::from_str(&out).unwrap();
    for (agent, pid) in [
        ("volume-manager", recorded_pid),
        ("app-manager", unrecorded_pid),
    ] {
        let state = agent_state(&view, agent);
        assert!(
            state.starts_with(&format!("up (no supervisor: orphan pid {pid}")),
            "{agent} is shown as an orphan: {state}"
        );
    }
    let (_, text, _) = cairn(root.path(), &["status"]);
    assert!(text.contains("orphan pid"), "{text}");

    let up = Up::start_in(root, &cairn_bin(), &[]);
    up.wait_status(Duration::from_secs(60), |v| {
        AGENTS.iter().all(|a| agent_state(v, a) == "up")
    });
    assert!(!alive(recorded_pid) && !alive(unrecorded_pid));
    let _ = recorded.0.wait();
    let _ = unrecorded.0.wait();
    let log = up.log();
    let stopped = log
        .find("orphan agent(s) stopped")
        .unwrap_or_else(|| panic!("the orphans' stop is logged:\n{log}"));
    for (agent, pid) in [
        ("volume-manager", recorded_pid),
        ("app-manager", unrecorded_pid),
    ] {
        assert!(
            log.contains(&format!("stopping orphan {agent} pid {pid}")),
            "{agent} is named:\n{log}"
        );
    }
    assert!(
        log.find("\n[")
            .is_none_or(|first_agent_line| first_agent_line > stopped),
        "no agent started before the orphans were stopped:\n{log}"
    );
    assert!(!log.contains("already published"), "{log}");
    assert_eq!(
        agent_processes(up.path()).len(),
        AGENTS.len(),
        "one set of agents"
    );
}

/// A stranger that takes an agent's topic while the supervisor waits to restart it: the agent
/// says so without a backtrace (even with RUST_BACKTRACE=1), the supervisor names the holder in
/// one line and stops it, and the agent runs again — no restart loop against the holder.
#[test]
fn an_agent_whose_topic_is_held_says_so_in_one_line_and_the_holder_is_stopped() {
    let up = Up::start_with_env(
        tempfile::tempdir().unwrap(),
        &cairn_bin(),
        &[],
        &[("RUST_BACKTRACE", "1")],
    );
    up.wait_status(Duration::from_secs(30), |v| {
        AGENTS.iter().all(|a| agent_state(v, a) == "up")
    });
    let (run, persist) = (up.path().join("run"), up.path().join("persist"));
    let lock = run.join("volume-manager/VolumeStatus.lock");
    // The stranger must take the topic in the supervisor's restart delay: tried a few times.
    let mut stranger = None;
    for _ in 0..5 {
        let Some(&supervised) = up.agent_pids().get("volume-manager") else {
            std::thread::sleep(Duration::from_millis(100));
            continue;
        };
        kill(Pid::from_raw(supervised), Signal::SIGKILL).unwrap();
        wait_gone(&[supervised], Duration::from_secs(5), "the killed agent");
        let mut candidate = Reaped(
            Command::new(agent_bin("volume-manager"))
                .env("CAIRN_RUN_DIR", &run)
                .env("CAIRN_PERSIST_DIR", &persist)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
        let pid = candidate.0.id() as i32;
        let deadline = Instant::now() + Duration::from_secs(5);
        let won = loop {
            if std::fs::read_to_string(&lock).is_ok_and(|holder| holder.trim() == pid.to_string()) {
                break true;
            }
            if candidate.0.try_wait().unwrap().is_some() || Instant::now() > deadline {
                break false;
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        if won {
            stranger = Some(candidate);
            break;
        }
        drop(candidate);
        up.wait_status(Duration::from_secs(30), |v| {
            agent_state(v, "volume-manager") == "up"
        });
    }
    let stranger = stranger.expect("a stranger took the topic in one of 5 tries");
    let stranger_pid = stranger.0.id() as i32;
    let said = format!("[volume-manager] cannot start: its topic is held by pid {stranger_pid}");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !up.log().contains(&said) {
        assert!(
            Instant::now() < deadline,
            "the supervisor names the holder:\n{}",
            up.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    wait_gone(&[stranger_pid], Duration::from_secs(50), "the stranger");
    up.wait_status(Duration::from_secs(30), |v| {
        AGENTS.iter().all(|a| agent_state(v, a) == "up")
    });
    let supervised = up.agent_pids()["volume-manager"];
    assert_eq!(
        std::fs::read_to_string(&lock).unwrap().trim(),
        supervised.to_string(),
        "the supervised agent publishes again"
    );
    let log = up.log();
    assert!(
        !log.contains("stack backtrace") && !log.contains("Stack backtrace"),
        "no backtrace for a held topic:\n{log}"
    );
    assert_eq!(
        log.matches(&said).count(),
        1,
        "one line, not a restart loop:\n{log}"
    );
    drop(stranger);
}
