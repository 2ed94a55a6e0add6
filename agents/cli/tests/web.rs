//! `cairn up --http ADDR`: the read-only web page and JSON API, read the way a technician's
//! laptop reads them: plain HTTP/1.1 over TCP for the API and every bad request, and Debian's
//! `chromium` driven through `chromedriver` (WebDriver, on loopback) for what a person sees.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test
#![allow(clippy::disallowed_methods)] // test code: blocking file work is fine here

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{
    DEMO_APP, DEMO_SNAPSHOT, NORTH_VOLUME, SOUTH_APP, SOUTH_VOLUME, Up, cairn_bin, demo_ready,
    free_port, get, http, two_tenants_config, write_atomically,
};
use fantoccini::{Client, ClientBuilder, Locator};
use nix::sys::signal::Signal;

const DEVICE_TOKEN: &str = "device-token-5f1c9a0e7b";
const NORTH_TOKEN: &str = "north-token-0a9c7e5b3d";
const SOUTH_TOKEN: &str = "south-token-c4e2a8f6b1";

fn bearer(token: &str) -> Vec<String> {
    vec![format!("Authorization: Bearer {token}")]
}

/// The head of a response that does not end (server-sent events).
fn head_only(port: u16, path: &str) -> String {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    write!(stream, "GET {path} HTTP/1.1\r\nHost: device\r\n\r\n").unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 1024];
    while !String::from_utf8_lossy(&seen).contains("\r\n\r\n") {
        let n = stream.read(&mut buf).unwrap();
        assert!(n > 0, "closed before its head ended");
        seen.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&seen).into_owned()
}

/// Polls `check` (bounded) until it returns Some.
fn eventually<T>(what: &str, within: Duration, up: &Up, check: impl Fn() -> Option<T>) -> T {
    let deadline = Instant::now() + within;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not within {within:?}\n--- cairn up log ---\n{}",
            up.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn the_api_prints_what_the_cli_prints_and_bad_requests_get_clear_answers() {
    let port = free_port("127.0.0.1");
    let up = Up::start(&["--http", &format!("127.0.0.1:{port}")]);
    up.wait_status(Duration::from_secs(90), demo_ready);

    // One model: the API's bytes are the CLI's (read until two reads agree, as values such as
    // the last contact time move on between them).
    for (path, args) in [
        ("/api/v1/status", &["status", "--json"][..]),
        ("/api/v1/snapshots", &["snapshots", "--json"][..]),
        (
            "/api/v1/snapshots/demo-logger",
            &["snapshots", "demo-logger", "--json"][..],
        ),
    ] {
        eventually(
            &format!("{path} equal to cairn {args:?}"),
            Duration::from_secs(30),
            &up,
            || {
                let (status, head, body) = get(port, path);
                assert_eq!(status, 200, "{path}: {head}\n{body}");
                assert!(head.contains("application/json"), "{head}");
                let (code, cli, _) = up.cairn(args);
                assert_eq!(code, 0);
                (body == cli).then_some(())
            },
        );
    }
    let (_, _, snapshots) = get(port, &format!("/api/v1/snapshots/{DEMO_APP}"));
    assert!(snapshots.contains(DEMO_SNAPSHOT), "{snapshots}");

    let (status, _, page) = get(port, "/");
    assert_eq!(status, 200);
    assert!(
        page.contains("demo-logger") && page.contains(&DEMO_SNAPSHOT[..8]),
        "{page}"
    );
    assert!(
        page.contains("EventSource"),
        "the page follows live changes"
    );
    let (status, _, content) = get(port, "/content");
    assert_eq!(status, 200);
    assert!(
        content.contains("demo-logger") && !content.contains("<html"),
        "{content}"
    );
    let events = head_only(port, "/api/v1/events");
    assert!(
        events.starts_with("HTTP/1.1 200") && events.contains("text/event-stream"),
        "{events}"
    );

    // Bad requests: each answered, none changes anything.
    let (status, _, body) = get(port, "/api/v1/nothing-here");
    assert_eq!(status, 404);
    assert!(body.contains("no page /api/v1/nothing-here"), "{body}");
    let (status, _, body) = get(port, "/api/v1/snapshots/no-such-app");
    assert_eq!(status, 404);
    assert!(body.contains("no app \"no-such-app\""), "{body}");
    for method in ["POST", "PUT", "DELETE"] {
        let (status, _, _) = http(
            port,
            method,
            "/api/v1/status",
            &["Content-Length: 0".into()],
        );
        assert_eq!(status, 405, "{method} must not exist");
    }
    let huge = vec![format!("X-Filler: {}", "a".repeat(20 * 1024))];
    let (status, _, body) = http(port, "GET", "/api/v1/status", &huge);
    assert_eq!(status, 431, "{body}");
    let enormous = vec![format!("X-Filler: {}", "a".repeat(1024 * 1024))];
    let (status, _, _) = http(port, "GET", "/api/v1/status", &enormous);
    assert!(
        status == 431 || status == 0,
        "a 1 MiB header is refused or the connection closed, got {status}"
    );
    // A token that is wrong is refused even on loopback, with the browser's prompt.
    let (status, head, body) = http(
        port,
        "GET",
        "/api/v1/status",
        &bearer("wrong-token-1234567890"),
    );
    assert_eq!(status, 401, "{body}");
    assert!(head.contains("www-authenticate: Basic"), "{head}");
    assert!(!body.contains("wrong-token"), "{body}");
    // Still serving after all of it.
    assert_eq!(get(port, "/api/v1/status").0, 200);
    drop(up);
}

fn write_tokens(persist: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let dir = persist.join("config");
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("web-tokens");
    std::fs::write(
        &file,
        format!("# test tokens\ndevice {DEVICE_TOKEN}\ntenant:north {NORTH_TOKEN}\ntenant:south {SOUTH_TOKEN}\n"),
    )
    .unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
}

fn app_names(status_json: &str) -> Vec<String> {
    let view: serde_json::Value = serde_json::from_str(status_json).unwrap();
    let mut names: Vec<String> = view["apps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["DisplayName"].as_str().unwrap().to_string())
        .collect();
    names.sort();
    names
}

#[test]
fn a_non_loopback_bind_needs_tokens_and_each_tenant_sees_only_its_apps() {
    // Without a token file the page is not served at all; the agents run on.
    let port = free_port("0.0.0.0");
    let up = Up::start(&["--http", &format!("0.0.0.0:{port}")]);
    eventually(
        "the refusal for want of tokens",
        Duration::from_secs(30),
        &up,
        || up.log().contains("needs bearer tokens").then_some(()),
    );
    assert!(TcpStream::connect(("127.0.0.1", port)).is_err());
    up.wait_status(Duration::from_secs(90), demo_ready);
    drop(up);

    let root = tempfile::tempdir().unwrap();
    let config = root.path().join("tenants.json");
    std::fs::write(&config, two_tenants_config()).unwrap();
    write_tokens(&root.path().join("persist"));
    let port = free_port("0.0.0.0");
    let up = Up::start_in(
        root,
        &cairn_bin(),
        &[
            "--config",
            config.to_str().unwrap(),
            "--http",
            &format!("0.0.0.0:{port}"),
        ],
    );
    up.wait_status(Duration::from_secs(90), |v| {
        v["apps"].as_array().is_some_and(|a| a.len() == 2)
    });
    let (status, head, body) = get(port, "/api/v1/status");
    assert_eq!(status, 401, "no token on a non-loopback bind: {body}");
    assert!(head.contains("www-authenticate"), "{head}");

    let (status, _, all) = http(port, "GET", "/api/v1/status", &bearer(DEVICE_TOKEN));
    assert_eq!(status, 200, "{all}");
    assert_eq!(app_names(&all), ["pump", "valve"]);
    let (status, _, north) = http(port, "GET", "/api/v1/status", &bearer(NORTH_TOKEN));
    assert_eq!(status, 200, "{north}");
    assert_eq!(app_names(&north), ["pump"]);
    assert!(!north.contains(SOUTH_APP), "{north}");
    // A tenant sees its own apps' volumes, and no other tenant's.
    let volume_ids = |status_json: &str| -> Vec<String> {
        let view: serde_json::Value = serde_json::from_str(status_json).unwrap();
        let mut ids: Vec<String> = view["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["VolumeID"].as_str().unwrap().to_string())
            .collect();
        ids.sort();
        ids
    };
    assert_eq!(volume_ids(&all), [NORTH_VOLUME, SOUTH_VOLUME], "{all}");
    assert_eq!(volume_ids(&north), [NORTH_VOLUME], "{north}");
    let north_view: serde_json::Value = serde_json::from_str(&north).unwrap();
    let backend = north_view["volumes"][0]["Backend"]
        .as_str()
        .unwrap()
        .to_string();
    let (_, _, south_page) = http(port, "GET", "/", &bearer(SOUTH_TOKEN));
    assert!(
        south_page.contains("valve") && !south_page.contains("pump"),
        "{south_page}"
    );
    // Another tenant's app is as unknown as a missing one.
    let (status, _, _) = http(
        port,
        "GET",
        &format!("/api/v1/snapshots/{SOUTH_APP}"),
        &bearer(NORTH_TOKEN),
    );
    assert_eq!(status, 404);
    // The browser's prompt sends the token as a Basic password.
    let basic = format!(
        "Authorization: Basic {}",
        base64_encode(format!("technician:{NORTH_TOKEN}").as_bytes())
    );
    let (status, _, north_page) = http(port, "GET", "/", &[basic]);
    assert_eq!(status, 200);
    assert!(north_page.contains("pump") && !north_page.contains("valve"));

    // In a real browser, with the token typed into the URL's password.
    let shots = screenshot_dir("tenant");
    browse(|browser| async move {
        browser
            .goto(&format!(
                "http://technician:{NORTH_TOKEN}@127.0.0.1:{port}/"
            ))
            .await
            .unwrap();
        // Live updates work with the token too (the page is opened before the app runs).
        wait_css(&browser, "#live.ok").await;
        text_when(&browser, "section.app[data-app=\"pump\"]", |t| {
            t.contains("RUNNING")
        })
        .await;
        // Its app's volume on its card, with backend and size; none of the other tenant's.
        let volume = text_when(
            &browser,
            &format!(
                "section.app[data-app=\"pump\"] table.volumes tr[data-volume=\"{NORTH_VOLUME}\"]"
            ),
            |t| t.contains("Ready"),
        )
        .await;
        assert!(
            volume.contains(&backend) && (volume.contains(" B") || volume.contains("iB")),
            "backend and size: {volume}"
        );
        let html = browser.source().await.unwrap();
        assert!(
            !html.contains(SOUTH_VOLUME),
            "another tenant's volume shown"
        );
        let body = text_when(&browser, "body", |_| true).await;
        assert!(!body.contains("valve"), "{body}");
        assert!(!body.contains(NORTH_TOKEN), "a token is never rendered");
        std::fs::write(
            shots.join("tenant-north.png"),
            browser.screenshot().await.unwrap(),
        )
        .unwrap();
    });

    // Wrong tokens: 401, then 429 for that peer, even with a right token.
    let mut limited = false;
    for _ in 0..=cairn_web::FAILURE_LIMIT {
        let (status, _, body) = http(
            port,
            "GET",
            "/api/v1/status",
            &bearer("guess-guess-guess-guess"),
        );
        assert!(status == 401 || status == 429, "{status} {body}");
        if status == 429 {
            limited = true;
            break;
        }
    }
    assert!(limited, "wrong tokens are rate-limited");
    assert_eq!(
        http(port, "GET", "/api/v1/status", &bearer(DEVICE_TOKEN)).0,
        429
    );
    let log = up.log();
    for token in [DEVICE_TOKEN, NORTH_TOKEN, SOUTH_TOKEN, "guess-guess"] {
        assert!(!log.contains(token), "a token reached the log:\n{log}");
    }
    drop(up);
}

fn base64_encode(bytes: &[u8]) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Where a test's screenshots go: `<target>/tmp/web-screenshots/<test>/`.
fn screenshot_dir(test: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join("web-screenshots")
        .join(test);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// `chromedriver` on a loopback port, stopped when dropped; chromium's profile and temporary
/// files go into `tmp`, removed with it.
struct Driver {
    child: Child,
    port: u16,
    tmp: tempfile::TempDir,
}

impl Driver {
    fn start() -> Self {
        let port = free_port("127.0.0.1");
        let tmp = tempfile::tempdir().unwrap();
        // Its own process group: a test that panics before closing its session still takes
        // chromium and its helpers down with the group.
        let child = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .env("TMPDIR", tmp.path())
            .process_group(0)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver (Debian's chromium-driver; scripts/install-deps installs it)");
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "chromedriver did not listen on {port}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Self { child, port, tmp }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let group = nix::unistd::Pid::from_raw(-(self.child.id() as i32));
        let _ = nix::sys::signal::kill(group, Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

/// Runs `session` in a headless chromium at 1920x1080, then closes it.
fn browse<F, Fut>(session: F)
where
    F: FnOnce(Client) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let driver = Driver::start();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            serde_json::json!({
                "binary": "/usr/bin/chromium",
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                         "--disable-dev-shm-usage", "--window-size=1920,1080",
                         "--disable-crash-reporter", "--disable-breakpad",
                         format!("--user-data-dir={}", driver.tmp.path().join("profile").display())]
            }),
        );
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        let browser = ClientBuilder::new(connector)
            .capabilities(caps)
            .connect(&format!("http://127.0.0.1:{}", driver.port))
            .await
            .unwrap();
        session(browser.clone()).await;
        let _ = browser.close().await;
    });
    drop(driver);
}

async fn wait_css(browser: &Client, css: &str) -> fantoccini::elements::Element {
    browser
        .wait()
        .at_most(Duration::from_secs(90))
        .for_element(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("{css} not shown: {e}"))
}

/// The text of the element at `css` once `wanted` holds; the live update replaces elements at
/// any time, so each try finds it afresh (bounded).
async fn text_when(browser: &Client, css: &str, wanted: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut last = String::new();
    while Instant::now() < deadline {
        if let Ok(element) = browser.find(Locator::Css(css)).await
            && let Ok(text) = element.text().await
        {
            if wanted(&text) {
                return text;
            }
            last = text;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("{css} not as expected; last text: {last:?}");
}

const NEW_SNAPSHOT: &str = "d3e0c0de-0000-4000-8000-00000000c002";

#[test]
fn the_page_shows_the_demo_app_and_a_new_snapshot_without_reload_in_a_real_browser() {
    let port = free_port("127.0.0.1");
    let up = Up::start(&["--http", &format!("127.0.0.1:{port}")]);
    up.wait_status(Duration::from_secs(90), demo_ready);
    let config = up.path().join("config.json");
    let shots = screenshot_dir("demo");
    browse(|browser| async move {
        browser
            .goto(&format!("http://127.0.0.1:{port}/"))
            .await
            .unwrap();
        let row =
            format!("section.app[data-app=\"demo-logger\"] tr[data-snapshot=\"{DEMO_SNAPSHOT}\"]");
        text_when(&browser, &row, |t| {
            t.contains("available") && t.contains("Immediate")
        })
        .await;
        // Colour plus text: the state badge names the state.
        text_when(&browser, "section.app[data-app=\"demo-logger\"] h2", |t| {
            t.contains("RUNNING")
        })
        .await;
        wait_css(&browser, "#live.ok").await;
        std::fs::write(
            shots.join("demo-1920.png"),
            browser.screenshot().await.unwrap(),
        )
        .unwrap();

        // A page that reloaded would lose this mark.
        browser
            .execute("window.cairnMark = 42", vec![])
            .await
            .unwrap();
        let text = std::fs::read_to_string(&config).unwrap();
        let requested = text.replace(
            r#"{ "id": "d3e0c0de-0000-4000-8000-00000000c001", "type": "immediate" }"#,
            &format!(
                r#"{{ "id": "d3e0c0de-0000-4000-8000-00000000c001", "type": "immediate" }}, {{ "id": "{NEW_SNAPSHOT}", "type": "immediate" }}"#
            ),
        );
        assert_ne!(
            text, requested,
            "the demo config lists its snapshot as expected"
        );
        write_atomically(&config, &requested);
        wait_css(&browser, &format!("tr[data-snapshot=\"{NEW_SNAPSHOT}\"]")).await;
        let mark = browser
            .execute("return window.cairnMark", vec![])
            .await
            .unwrap();
        assert_eq!(mark, serde_json::json!(42), "the page was reloaded");

        browser.set_window_size(360, 800).await.unwrap();
        std::fs::write(
            shots.join("demo-360.png"),
            browser.screenshot().await.unwrap(),
        )
        .unwrap();
    });
    drop(up);
}

#[test]
fn a_pending_deletion_says_it_waits_for_the_app_to_stop_and_a_failed_one_shows_its_reason() {
    const APP: &str = "0000000a-0000-4000-8000-0000000000e1";
    const SNAPSHOT: &str = "0000000c-0000-4000-8000-0000000000e1";
    let root = tempfile::tempdir().unwrap();
    let config = root.path().join("device.json");
    write_atomically(
        &config,
        &common::process_app_config(APP, "kept", "1", &[SNAPSHOT]),
    );
    let port = free_port("127.0.0.1");
    let up = Up::start_in(
        root,
        &cairn_bin(),
        &[
            "--config",
            config.to_str().unwrap(),
            "--http",
            &format!("127.0.0.1:{port}"),
        ],
    );
    let available = |v: &serde_json::Value| {
        common::app(v, "kept").is_some_and(|a| {
            a["State"] == common::RUNNING
                && a["SnapStatus"]["AvailableSnapshots"]
                    .as_array()
                    .is_some_and(|s| s.iter().any(|s| s["Snapshot"]["SnapshotID"] == SNAPSHOT))
        })
    };
    up.wait_status(Duration::from_secs(90), available);
    write_atomically(&config, &common::process_app_config(APP, "kept", "1", &[]));
    let row = eventually(
        "the pending deletion row",
        Duration::from_secs(60),
        &up,
        || {
            let (_, _, body) = get(port, "/api/v1/snapshots/kept");
            let rows: serde_json::Value = serde_json::from_str(&body).ok()?;
            rows.as_array()?
                .iter()
                .find(|r| r["id"] == SNAPSHOT && r["state"] == "pending deletion")
                .cloned()
        },
    );
    assert!(
        row["note"]
            .as_str()
            .unwrap()
            .contains("waits for the app to stop"),
        "{row}"
    );
    let (_, _, page) = get(port, "/");
    assert!(page.contains("waits for the app to stop"), "{page}");

    // The deletion made to fail (its copy immutable, so even root cannot remove it), then the
    // app restarted: the open page shows the reason on the snapshot's row.
    let copy = cairn_types::layout::volumes_dir(&up.path().join("persist"))
        .join(".snapshots")
        .join(cairn_types::volume_key(
            "0000000b-0000-4000-8000-000000000001".parse().unwrap(),
            0,
        ))
        .join(SNAPSHOT);
    assert!(
        copy.is_dir(),
        "the snapshot's copy is at {}",
        copy.display()
    );
    let pinned = Immutable::set(&copy);
    let shots = screenshot_dir("failed-deletion");
    browse(|browser| async move {
        browser
            .goto(&format!("http://127.0.0.1:{port}/"))
            .await
            .unwrap();
        wait_css(&browser, "#live.ok").await;
        let restarted = common::process_app_config(APP, "kept", "1", &[]).replace(
            r#""display_name": "kept","#,
            r#""display_name": "kept", "restart": 1,"#,
        );
        write_atomically(&config, &restarted);
        let row = text_when(
            &browser,
            &format!("tr[data-snapshot=\"{SNAPSHOT}\"]"),
            |t| t.contains("deleting snapshot") && t.contains("failed"),
        )
        .await;
        assert!(
            row.contains(&copy.display().to_string()),
            "the reason names the copy: {row}"
        );
        std::fs::write(
            shots.join("failed-deletion.png"),
            browser.screenshot().await.unwrap(),
        )
        .unwrap();
    });
    // Removable again before the root is removed.
    drop(pinned);
    drop(up);
}

/// `chattr +i` on a directory until dropped (so the test's root can be removed again).
struct Immutable(PathBuf);

impl Immutable {
    fn set(path: &Path) -> Self {
        let ok = Command::new("chattr")
            .arg("+i")
            .arg(path)
            .status()
            .unwrap()
            .success();
        assert!(ok, "chattr +i {} (e2fsprogs, root, ext4)", path.display());
        Self(path.to_path_buf())
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        let _ = Command::new("chattr").arg("-i").arg(&self.0).status();
    }
}

#[test]
fn with_tls_the_page_is_served_with_the_devices_own_certificate() {
    use std::os::unix::fs::PermissionsExt;
    // A device without its certificate says which files are missing; the agents run on.
    let port = free_port("127.0.0.1");
    let up = Up::start(&["--http", &format!("127.0.0.1:{port}"), "--http-tls"]);
    eventually(
        "the missing certificate named",
        Duration::from_secs(30),
        &up,
        || {
            let log = up.log();
            (log.contains("TLS needs the device's certificate") && log.contains("device.cert.pem"))
                .then_some(())
        },
    );
    up.wait_status(Duration::from_secs(90), demo_ready);
    drop(up);

    let root = tempfile::tempdir().unwrap();
    let config_dir = root.path().join("persist/config");
    std::fs::create_dir_all(&config_dir).unwrap();
    let device = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).unwrap();
    std::fs::write(config_dir.join("device.cert.pem"), device.cert.pem()).unwrap();
    let key = config_dir.join("device.key.pem");
    std::fs::write(&key, device.signing_key.serialize_pem()).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let port = free_port("127.0.0.1");
    let up = Up::start_in(
        root,
        &cairn_bin(),
        &["--http", &format!("127.0.0.1:{port}"), "--http-tls"],
    );
    up.wait_status(Duration::from_secs(90), demo_ready);

    // A client that trusts only the device's certificate reads the API.
    let mut roots = rustls::RootCertStore::empty();
    roots.add(device.cert.der().clone()).unwrap();
    let client = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(client));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let answer = runtime.block_on(async {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        let name = rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap();
        let mut tls = tokio::time::timeout(Duration::from_secs(30), connector.connect(name, tcp))
            .await
            .unwrap()
            .unwrap();
        tls.write_all(b"GET /api/v1/status HTTP/1.1\r\nHost: device\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(30), tls.read_to_end(&mut answer))
            .await
            .unwrap()
            .unwrap();
        String::from_utf8_lossy(&answer).into_owned()
    });
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("demo-logger"), "{answer}");
    // Plain HTTP on the TLS port gets no page.
    let (status, _, _) = get(port, "/api/v1/status");
    assert_ne!(status, 200);
    drop(up);
}

#[test]
fn an_export_job_shows_on_its_apps_card_with_its_state_and_reason() {
    let port = free_port("127.0.0.1");
    let up = Up::start(&["--http", &format!("127.0.0.1:{port}")]);
    up.wait_status(Duration::from_secs(90), demo_ready);
    // A target on a read-only mount (a real bind mount): the job fails, saying why.
    let target = up.path().join("exports");
    std::fs::create_dir(&target).unwrap();
    let path = target.to_str().unwrap();
    let mount = |args: &[&str]| {
        let status = std::process::Command::new("mount")
            .args(args)
            .status()
            .unwrap();
        assert!(status.success(), "mount {args:?} (this test needs root)");
    };
    mount(&["--bind", path, path]);
    let _unmount = Unmount(target.clone());
    mount(&["-o", "remount,bind,ro", path]);
    let (code, _, err) = up.cairn(&["export", DEMO_SNAPSHOT, "--to", path]);
    assert_eq!(code, 1, "{err}");

    let status = eventually(
        "the job in /api/v1/status",
        Duration::from_secs(30),
        &up,
        || {
            let (_, _, body) = get(port, "/api/v1/status");
            let view: serde_json::Value = serde_json::from_str(&body).unwrap();
            let jobs = view["exports"].as_array()?.clone();
            (!jobs.is_empty()).then_some(jobs)
        },
    );
    assert_eq!(status.len(), 1, "{status:?}");
    assert_eq!(status[0]["AppUUID"], DEMO_APP, "{status:?}");
    assert_eq!(status[0]["SnapshotID"], DEMO_SNAPSHOT, "{status:?}");
    assert_eq!(status[0]["State"], "Failed", "{status:?}");
    let job = status[0]["JobID"].as_str().unwrap().to_string();

    let (_, _, page) = get(port, "/");
    let card = page
        .split("<section class=\"wide app\"")
        .find(|s| s.contains("data-app=\"demo-logger\""))
        .unwrap_or_else(|| panic!("no demo-logger card: {page}"));
    let row = card
        .split("<tr")
        .find(|r| r.contains(&format!("data-export=\"{job}\"")))
        .unwrap_or_else(|| panic!("the job is not on the app's card: {card}"));
    assert!(row.contains("failed"), "{row}");
    assert!(row.contains("Read-only file system"), "{row}");
}

/// Lazily unmounts on drop.
struct Unmount(std::path::PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

#[test]
fn a_token_added_or_revoked_in_the_file_counts_from_the_next_request_and_a_broken_file_admits_none()
{
    use std::os::unix::fs::PermissionsExt;
    let port = free_port("127.0.0.1");
    let up = Up::start(&["--http", &format!("127.0.0.1:{port}")]);
    let file = up.path().join("persist/config/web-tokens");
    let write = |text: &str| {
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        let new = file.with_extension("new");
        std::fs::write(&new, text).unwrap();
        std::fs::set_permissions(&new, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::rename(&new, &file).unwrap();
    };
    up.wait_status(Duration::from_secs(90), demo_ready);
    let status_with = |token: &str| http(port, "GET", "/api/v1/status", &bearer(token)).0;

    // No file when the server started: a token written afterwards is accepted at once.
    write(&format!("device {DEVICE_TOKEN}\n"));
    assert_eq!(status_with(DEVICE_TOKEN), 200);
    // Revoked: the old token is refused, its replacement accepted.
    let replacement = "replacement-token-0123456789";
    write(&format!("device {replacement}\n"));
    assert_eq!(status_with(DEVICE_TOKEN), 401);
    assert_eq!(status_with(replacement), 200);
    // A file that no longer loads admits no token, and says why without showing one.
    write(&format!("device {replacement}\nnobody {DEVICE_TOKEN}\n"));
    assert_eq!(status_with(replacement), 401);
    let log = up.log();
    assert!(
        log.contains("line 2") && log.contains("no token is accepted"),
        "{log}"
    );
    assert!(
        !log.contains(replacement) && !log.contains(DEVICE_TOKEN),
        "a token was logged"
    );
}

const KEPT_APP: &str = "0000000a-0000-4000-8000-0000000000f1";
const VM_APP: &str = "0000000a-0000-4000-8000-0000000000f2";
const DATA_VOLUME: &str = "0000000b-0000-4000-8000-000000000001";

/// A named device with a process app on a directory volume, and a VM whose kernel is missing
/// (it cannot boot: an error to act on).
fn identity_config() -> String {
    let process = common::process_app_config(KEPT_APP, "kept", "1", &[]);
    let mut config: serde_json::Value = serde_json::from_str(&process).unwrap();
    config["device_name"] = "pump-station-7".into();
    config["apps"].as_array_mut().unwrap().push(serde_json::json!({
        "uuid": VM_APP, "version": "1", "display_name": "vm-app",
        "domain": { "kind": "vm", "kernel": "/nonexistent/vmlinuz", "initrd": "/nonexistent/initrd",
                    "memory_mib": 64 }
    }));
    config.to_string()
}

#[test]
fn the_page_names_the_device_and_shows_each_apps_kind_volumes_and_errors_with_what_to_do() {
    let root = tempfile::tempdir().unwrap();
    // The serial given at onboarding (`cairn up --serial`) is kept here.
    let config_dir = root.path().join("persist/config");
    std::fs::create_dir_all(&config_dir).unwrap();
    std::fs::write(config_dir.join("serial"), "SN-WEB-42\n").unwrap();
    let config = root.path().join("device.json");
    write_atomically(&config, &identity_config());
    let port = free_port("127.0.0.1");
    let up = Up::start_in(
        root,
        &cairn_bin(),
        &[
            "--config",
            config.to_str().unwrap(),
            "--http",
            &format!("127.0.0.1:{port}"),
        ],
    );
    up.wait_status(Duration::from_secs(90), |v| {
        common::app(v, "kept").is_some_and(|a| a["State"] == common::RUNNING)
            && common::app(v, "vm-app")
                .is_some_and(|a| !a["Error"]["Error"].as_str().unwrap_or("").is_empty())
            && v["volumes"].as_array().is_some_and(|v| !v.is_empty())
    });

    // The JSON API: the device's name and serial, each app's kind, volumes and errors.
    let (status, _, body) = get(port, "/api/v1/status");
    assert_eq!(status, 200, "{body}");
    let view: serde_json::Value = serde_json::from_str(&body).unwrap();
    let device = &view["device"];
    assert_eq!(device["DeviceName"], "pump-station-7", "{device}");
    assert_eq!(device["Serial"], "SN-WEB-42", "{device}");
    assert!(!device["HostName"].as_str().unwrap().is_empty(), "{device}");
    let kept = common::app(&view, "kept").unwrap();
    assert_eq!(kept["DomainKind"], "process", "{kept}");
    assert_eq!(kept["VirtualizationMode"], "", "{kept}");
    assert_eq!(
        kept["VolumeRefStatusList"][0]["VolumeID"], DATA_VOLUME,
        "{kept}"
    );
    let vm = common::app(&view, "vm-app").unwrap();
    assert_eq!(vm["DomainKind"], "vm", "{vm}");
    assert_eq!(vm["VirtualizationMode"], "HVM", "{vm}");
    let problem = view["problems"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["app"] == VM_APP)
        .unwrap_or_else(|| panic!("no problem of vm-app: {}", view["problems"]));
    assert!(problem["time"].is_string(), "{problem}");
    assert!(
        !problem["what_to_do"].as_str().unwrap().is_empty(),
        "{problem}"
    );
    // `cairn status` prints the same, in words.
    let (_, text, _) = up.cairn(&["status"]);
    assert!(
        text.contains("name pump-station-7") && text.contains("serial SN-WEB-42"),
        "{text}"
    );
    assert!(
        text.contains("error    app vm-app") && text.contains("  to do  "),
        "{text}"
    );

    let shots = screenshot_dir("identity");
    browse(|browser| async move {
        browser
            .goto(&format!("http://127.0.0.1:{port}/"))
            .await
            .unwrap();
        wait_css(&browser, "#live.ok").await;
        let header = text_when(&browser, "header h1", |t| t.contains("pump-station-7")).await;
        assert!(header.contains("Cairn device"), "{header}");
        text_when(&browser, "#serial", |t| t.contains("SN-WEB-42")).await;
        text_when(&browser, "section.app[data-app=\"kept\"] dd.kind", |t| {
            t.contains("process")
        })
        .await;
        text_when(&browser, "section.app[data-app=\"vm-app\"] dd.kind", |t| {
            t.contains("VM") && t.contains("HVM")
        })
        .await;
        // The volume on its app's card, with its backend and size.
        let volume = text_when(
            &browser,
            &format!(
                "section.app[data-app=\"kept\"] table.volumes tr[data-volume=\"{DATA_VOLUME}\"]"
            ),
            |t| t.contains("Ready"),
        )
        .await;
        assert!(
            volume.contains("data") && volume.contains("of 1.0 MiB"),
            "{volume}"
        );
        // The VM's error with its time and what to do.
        let problem = text_when(
            &browser,
            "section.app[data-app=\"vm-app\"] li.problem",
            |t| t.contains("What to do:"),
        )
        .await;
        assert!(problem.contains("ago"), "its time: {problem}");
        std::fs::write(
            shots.join("identity-1920.png"),
            browser.screenshot().await.unwrap(),
        )
        .unwrap();
        browser.set_window_size(360, 800).await.unwrap();
        std::fs::write(
            shots.join("identity-360.png"),
            browser.screenshot().await.unwrap(),
        )
        .unwrap();
    });
    drop(up);
}

#[test]
fn a_read_only_persist_shows_on_the_open_page_with_what_to_do() {
    const APP: &str = "0000000a-0000-4000-8000-0000000000f3";
    let root = tempfile::tempdir().unwrap();
    let config = root.path().join("device.json");
    // One quiet app: nothing the agents publish changes while persist turns read-only.
    write_atomically(&config, &common::process_app_config(APP, "kept", "1", &[]));
    let port = free_port("127.0.0.1");
    let up = Up::start_in(
        root,
        &cairn_bin(),
        &[
            "--config",
            config.to_str().unwrap(),
            "--http",
            &format!("127.0.0.1:{port}"),
        ],
    );
    up.wait_status(Duration::from_secs(90), |v| {
        common::app(v, "kept").is_some_and(|a| a["State"] == common::RUNNING)
    });
    let persist_for_browser = up.path().join("persist");
    let shots = screenshot_dir("read-only-persist");
    browse(|browser| async move {
        browser
            .goto(&format!("http://127.0.0.1:{port}/"))
            .await
            .unwrap();
        wait_css(&browser, "#live.ok").await;
        text_when(&browser, "section.app[data-app=\"kept\"]", |t| {
            t.contains("RUNNING")
        })
        .await;
        // A page that reloaded would lose this mark.
        browser
            .execute("window.cairnMark = 7", vec![])
            .await
            .unwrap();

        // Persist made read-only under the open page (a real read-only bind mount): the page
        // says so, and what to do, without a reload.
        let path = persist_for_browser.to_str().unwrap().to_string();
        let mount = |args: &[&str]| {
            let status = Command::new("mount").args(args).status().unwrap();
            assert!(status.success(), "mount {args:?} (this test needs root)");
        };
        mount(&["--bind", &path, &path]);
        let _unmount = Unmount(persist_for_browser.clone());
        mount(&["-o", "remount,bind,ro", &path]);
        text_when(&browser, "#persist-fault", |t| t.starts_with("read-only")).await;
        let advice = text_when(
            &browser,
            "#problems li.problem[data-about=\"persist\"]",
            |t| t.contains("What to do:"),
        )
        .await;
        assert!(advice.contains("remount it read-write"), "{advice}");
        let mark = browser
            .execute("return window.cairnMark", vec![])
            .await
            .unwrap();
        assert_eq!(mark, serde_json::json!(7), "the page was reloaded");
        browser
            .execute("window.scrollTo(0, 0)", vec![])
            .await
            .unwrap();
        std::fs::write(
            shots.join("read-only-persist.png"),
            browser.screenshot().await.unwrap(),
        )
        .unwrap();
    });
    drop(up);
}
