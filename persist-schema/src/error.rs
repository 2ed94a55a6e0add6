use std::io;
use std::path::PathBuf;

/// Why the bytes of a record could not be turned into a value. Every variant is a fault of the
/// stored data (or of a newer writer), never of this process; none of them panics.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("the file is empty")]
    Empty,
    #[error("the record is truncated: it ends after {len} bytes in the middle of the JSON")]
    Truncated { len: usize },
    #[error("not valid JSON at line {line}, column {column}: {message}")]
    Malformed {
        line: usize,
        column: usize,
        message: String,
    },
    #[error(
        "not a Cairn record (no schema/version/sha256/record envelope), and {schema} records \
         cannot be imported from plain JSON"
    )]
    NotARecord { schema: &'static str },
    #[error("the record envelope is damaged: {0}")]
    BadEnvelope(String),
    #[error("holds a {found} record, expected {expected}")]
    WrongSchema {
        expected: &'static str,
        found: String,
    },
    #[error(
        "checksum mismatch, the record was altered or torn: stored sha256 {stored}, \
         computed {computed}"
    )]
    Corrupt { stored: String, computed: String },
    #[error("missing mandatory field{}: {}", if .0.len() == 1 { "" } else { "s" }, .0.join(", "))]
    MissingFields(Vec<String>),
    #[error("field {path}: {message}")]
    Invalid { path: String, message: String },
    #[error(
        "written as version {version} by a newer build, which marked it readable only by builds \
         of version {readable_from} or later (a field's meaning changed); this build reads up to \
         version {current}: refused, not misread"
    )]
    TooNew {
        version: u32,
        readable_from: u32,
        current: u32,
    },
    #[error("no migration from version {from} (this build writes version {current})")]
    NoMigration { from: u32, current: u32 },
    #[error("migration from version {from} failed: {message}")]
    MigrationFailed { from: u32, message: String },
}

impl DecodeError {
    pub(crate) fn from_json(err: &serde_json::Error, len: usize) -> Self {
        match err.classify() {
            serde_json::error::Category::Eof => DecodeError::Truncated { len },
            _ => DecodeError::Malformed {
                line: err.line(),
                column: err.column(),
                message: err.to_string(),
            },
        }
    }
}

/// What went wrong with one record file.
#[derive(Debug, thiserror::Error)]
pub enum ErrorKind {
    #[error("does not exist")]
    NotFound,
    #[error("{op} failed: {source}{}", enospc_hint(.source))]
    Io {
        op: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("{0}")]
    Decode(#[from] DecodeError),
    #[error("cannot be encoded: {0}")]
    Encode(#[source] serde_json::Error),
    #[error("is unreadable ({primary}) and so is its backup ({backup})")]
    BackupAlsoFailed {
        primary: Box<ErrorKind>,
        backup: Box<ErrorKind>,
    },
}

fn enospc_hint(err: &io::Error) -> &'static str {
    if err.raw_os_error() == Some(28) {
        " — the disk is full: free space on the partition; the previous record is intact"
    } else {
        ""
    }
}

impl ErrorKind {
    /// True when the stored bytes are damaged (as opposed to absent or unreachable).
    pub fn is_corrupt(&self) -> bool {
        match self {
            ErrorKind::Decode(err) => matches!(
                err,
                DecodeError::Empty
                    | DecodeError::Truncated { .. }
                    | DecodeError::Malformed { .. }
                    | DecodeError::BadEnvelope(_)
                    | DecodeError::Corrupt { .. }
            ),
            ErrorKind::BackupAlsoFailed { primary, .. } => primary.is_corrupt(),
            _ => false,
        }
    }

    pub(crate) fn io(op: &'static str, source: io::Error) -> Self {
        if source.kind() == io::ErrorKind::NotFound && op == "reading" {
            ErrorKind::NotFound
        } else {
            ErrorKind::Io { op, source }
        }
    }
}

/// A failure on one record file: names the schema, the file and the fault.
#[derive(Debug, thiserror::Error)]
#[error("{schema} record {}: {kind}", path.display())]
pub struct PersistError {
    pub schema: &'static str,
    pub path: PathBuf,
    pub kind: ErrorKind,
}
