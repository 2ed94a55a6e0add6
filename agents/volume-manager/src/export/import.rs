//! Making a volume from an export (`VolumeOrigin::Export`): the export and its chain are
//! verified first, then the last link is converted (through its backing chain) into a new,
//! independent qcow2.

use std::path::Path;

use uuid::Uuid;

use cairn_types::export::ExportContent;

use super::verify;

/// A volume's config and its export's content agree: an image volume from a qcow2, a
/// directory volume from a tree.
pub(crate) fn check_content(content: ExportContent, tree: bool) -> Result<(), String> {
    match (content, tree) {
        (ExportContent::Tree, false) => Err(
            "the export holds this volume as a directory tree: declare the volume with format dir"
                .into(),
        ),
        (ExportContent::Qcow2, true) => Err(
            "the export holds this volume as a qcow2 image: declare the volume with format qcow2"
                .into(),
        ),
        _ => Ok(()),
    }
}
use crate::error::VolumeError;

/// Writes volume `volume` of the export in `dir` into `out`: a new qcow2 (`out` must not
/// exist), or, for a directory volume (`tree`), its tree unpacked into the made directory `out`.
pub async fn materialize(
    key: &str,
    dir: &Path,
    volume: Uuid,
    out: &Path,
    tree: bool,
) -> Result<(), VolumeError> {
    let failed = |what: String| VolumeError::Unsupported {
        volume: key.to_string(),
        what,
    };
    let checked = dir.to_path_buf();
    let (manifest, _) =
        tokio::task::spawn_blocking(move || verify::verify_export(&checked, &mut |_, _| true))
            .await
            .map_err(|e| failed(format!("verifying export {}: {e}", dir.display())))?
            .map_err(|e| failed(format!("cannot be restored from the export: {e}")))?;
    let entry = manifest.volume(volume).ok_or_else(|| {
        failed(format!(
            "export {} has no volume {volume} (it has {})",
            dir.display(),
            manifest
                .volumes
                .iter()
                .map(|v| v.volume_id.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ))
    })?;
    let source = dir.join(&entry.file);
    check_content(entry.content, tree).map_err(&failed)?;
    if tree {
        tracing::info!(volume = key, export = %dir.display(), file = %entry.file, "restoring a directory volume from an export");
        let (archive, dest) = (source.clone(), out.to_path_buf());
        return tokio::task::spawn_blocking(move || super::tree::unpack(&archive, &dest))
            .await
            .map_err(|e| failed(e.to_string()))?
            .map_err(|e| failed(format!("unpacking {}: {e}", source.display())));
    }
    tracing::info!(volume = key, export = %dir.display(), file = %entry.file, kind = ?entry.kind, "restoring a volume from an export");
    convert_into_volume(&source, out)
        .await
        .map_err(|e| crate::backend::image_error(key, out, e))
}

/// The volume file `out` made from the exported image `source` (and its backing chain, already
/// checked): one `qemu-img convert` into a fresh qcow2, so the volume depends on no export file.
pub(super) async fn convert_into_volume(
    source: &Path,
    out: &Path,
) -> Result<(), crate::process::CommandError> {
    crate::process::run(
        "qemu-img",
        &[
            "convert".as_ref(),
            "-f".as_ref(),
            "qcow2".as_ref(),
            "-O".as_ref(),
            "qcow2".as_ref(),
            source.as_os_str(),
            out.as_os_str(),
        ],
        std::time::Duration::from_secs(24 * 3600),
    )
    .await
    .map(drop)
}
