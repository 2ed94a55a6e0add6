//! EdgeView from a stock EVE controller's config: `EdgeDevConfig.edgeview` (EVE's fields only:
//! the token the controller signed, the dispatcher's certificate, the device policy) puts the
//! edgeview agent on the dispatcher; a client's EVE-format command gets its answer through it;
//! the controller receives `ZInfoEdgeview` decoded with EVE's definitions; a token the device
//! must refuse (another device's) never reaches the dispatcher.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;

use std::time::Duration;

use cairn_config_agent::proto::{DevDebugAccessPolicy, EdgeDevConfig, EdgeViewConfig};
use cairn_test_controller::TestController;
use cairn_test_controller::dispatcher::{Dispatcher, query, session_hash, system};

const SERIAL: &str = "CAIRN-EDGEVIEW-0001";
const NONCE: &str = "edgeview-e2e-nonce";
const WITHIN: Duration = Duration::from_secs(60);

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn edgeview(token: String, dispatcher: &Dispatcher, generation: u32) -> EdgeDevConfig {
    EdgeDevConfig {
        edgeview: Some(EdgeViewConfig {
            token,
            // The dispatcher's CA is not the device's root: EVE's field says whom to trust.
            disp_cert_pem: vec![dispatcher.ca_pem.clone().into_bytes()],
            dev_policy: Some(DevDebugAccessPolicy { allow_dev: true }),
            generation_id: generation,
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stock_eve_controller_turns_edgeview_on_and_reads_its_report() {
    let controller = TestController::start().await.unwrap();
    let dispatcher = Dispatcher::start().await;
    let dep = format!("https://{}/edge-view", dispatcher.addr);
    let exp = now() + 3600;
    let token = controller.edgeview_token(SERIAL, &dep, exp, NONCE);
    let mut device =
        common::follow(&controller, SERIAL, edgeview(token.clone(), &dispatcher, 1)).await;
    device.start("edgeview", None);

    let hash = session_hash(&token, 0);
    let deadline = tokio::time::Instant::now() + WITHIN;
    while dispatcher.peers(&hash) == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the device never reached the dispatcher: {:?}",
            dispatcher.devices()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let reply = query(&dispatcher, &hash, NONCE, system("configitem,lastreboot")).await;
    assert!(reply.contains("=== System: <lastreboot> ==="), "{reply}");
    assert!(
        reply.contains(&controller.device_uuid(SERIAL).to_string()),
        "{reply}"
    );

    let reported = controller
        .wait_for(
            SERIAL,
            WITHIN,
            "ZInfoEdgeview with the command counted",
            |d| d.edgeview_info().is_some_and(|ev| ev.count_dev == 1),
        )
        .await
        .unwrap();
    let ev = reported.edgeview_info().unwrap();
    assert_eq!(ev.expire_time.unwrap().seconds as u64, exp);
    assert!(ev.started_time.is_some());

    // Another device's token, signed by the same controller: refused on this device.
    let stranger = {
        let other = controller.edgeview_token("CAIRN-EDGEVIEW-OTHER", &dep, exp, NONCE);
        controller.set_config(SERIAL, edgeview(other.clone(), &dispatcher, 2));
        other
    };
    let connected_before = dispatcher.devices().len();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(dispatcher.peers(&session_hash(&stranger, 0)), 0);
    assert_eq!(dispatcher.devices().len(), connected_before);
    device.kill("edgeview");
}
