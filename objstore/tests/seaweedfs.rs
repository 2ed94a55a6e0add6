//! The remote client against a real SeaweedFS server: uploads, listings, refusals.
#![allow(clippy::disallowed_methods)] // test code: blocking file work is fine here
#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt;

use cairn_objstore::seaweedfs::{SECRET_KEY, SeaweedFs};
use cairn_objstore::{ErrorKind, Remote};
use cairn_types::RemoteConfig;
use sha2::{Digest, Sha256};

fn config(server: &SeaweedFs, bucket: &str) -> RemoteConfig {
    RemoteConfig {
        id: "backups".into(),
        endpoint: server.endpoint(),
        bucket: bucket.into(),
        prefix: "fleet/dev-1".into(),
        credentials_file: "s3.json".into(),
        ..RemoteConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_goes_up_in_parts_and_comes_back_identical() {
    let server = SeaweedFs::start();
    server.create_bucket("exports");
    let persist = tempfile::tempdir().unwrap();
    server.write_credentials(persist.path(), "s3.json", SECRET_KEY);
    let remote = Remote::open(&config(&server, "exports"), persist.path())
        .await
        .unwrap();
    remote.check().await.unwrap();
    // Two and a half parts.
    let local = persist.path().join("data.bin");
    let data: Vec<u8> = (0..(cairn_objstore::PART_SIZE * 5 / 2))
        .map(|i| (i * 7 % 251) as u8)
        .collect();
    std::fs::write(&local, &data).unwrap();
    let id = remote.begin_upload("e1/v.qcow2").await.unwrap();
    let mut last = 0;
    let sent = remote
        .send_file(&local, "e1/v.qcow2", &id, &mut |n| last = n)
        .await
        .unwrap();
    assert_eq!(sent.size, data.len() as u64);
    // The hash taken on the way up is the file's: the export's manifest records it.
    assert_eq!(sent.sha256, format!("{:x}", Sha256::digest(&data)));
    assert_eq!(last, data.len() as u64);
    assert!(
        server
            .keys("exports")
            .contains(&"fleet/dev-1/e1/v.qcow2".to_string())
    );
    assert_eq!(remote.get("e1/v.qcow2").await.unwrap().as_ref(), &data[..]);
    assert_eq!(remote.list_dirs("").await.unwrap(), vec!["e1".to_string()]);
    assert!(server.multipart_uploads("exports").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_upload_is_aborted() {
    let server = SeaweedFs::start();
    server.create_bucket("exports");
    let persist = tempfile::tempdir().unwrap();
    server.write_credentials(persist.path(), "s3.json", SECRET_KEY);
    let remote = Remote::open(&config(&server, "exports"), persist.path())
        .await
        .unwrap();
    let local = persist.path().join("data.bin");
    std::fs::write(&local, vec![1u8; cairn_objstore::PART_SIZE + 10]).unwrap();
    // An upload begun, then abandoned (as by a killed process): its recorded
    // id is all a restart has to abort it.
    let recorded = remote.begin_upload("e1/v.qcow2").await.unwrap();
    assert_eq!(
        server.multipart_uploads("exports"),
        vec!["fleet/dev-1/e1/v.qcow2".to_string()]
    );
    remote.abort_upload("e1/v.qcow2", &recorded).await.unwrap();
    assert!(
        server.multipart_uploads("exports").is_empty(),
        "{:?}",
        server.multipart_uploads("exports")
    );
    // A failed upload aborts itself: a missing local file fails it after it began.
    let id = remote.begin_upload("e2/v.qcow2").await.unwrap();
    let failed = remote
        .send_file(
            &persist.path().join("missing"),
            "e2/v.qcow2",
            &id,
            &mut |_| {},
        )
        .await;
    assert!(failed.is_err());
    assert!(server.multipart_uploads("exports").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_credentials_a_missing_bucket_and_a_loose_credentials_file_are_refused_by_name() {
    let server = SeaweedFs::start();
    server.create_bucket("exports");
    let persist = tempfile::tempdir().unwrap();

    let path = server.write_credentials(persist.path(), "s3.json", "not-the-secret-xyz");
    let remote = Remote::open(&config(&server, "exports"), persist.path())
        .await
        .unwrap();
    let err = remote.check().await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::Denied, "{err}");
    let text = err.to_string();
    assert!(
        text.contains("backups") && text.contains("access denied"),
        "{text}"
    );
    assert!(
        !text.contains("not-the-secret-xyz")
            && !text.contains(cairn_objstore::seaweedfs::ACCESS_KEY),
        "{text}"
    );

    server.write_credentials(persist.path(), "s3.json", SECRET_KEY);
    let remote = Remote::open(&config(&server, "no-such-bucket"), persist.path())
        .await
        .unwrap();
    let err = remote.check().await.unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("no-such-bucket") && text.contains("does not exist"),
        "{text}"
    );

    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = Remote::open(&config(&server, "exports"), persist.path())
        .await
        .unwrap_err();
    assert_eq!(err.kind, ErrorKind::Config);
    assert!(
        err.to_string().contains("mode 0600 and owned by root"),
        "{err}"
    );

    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::os::unix::fs::chown(&path, Some(65534), None).unwrap();
    let err = Remote::open(&config(&server, "exports"), persist.path())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("owner uid 65534"), "{err}");
}
