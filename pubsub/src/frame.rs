//! The wire: each frame is a 4-byte big-endian length and a MessagePack body. Values travel as
//! MessagePack maps (field names kept) so that optional, unknown and flattened fields behave as
//! they do in the JSON files.

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt};

/// Bumped when frames change incompatibly; a peer speaking another version is refused.
pub const PROTOCOL: u32 = 1;

/// Upper bound on one frame, so a garbage length prefix cannot make a peer allocate gigabytes.
/// Values far beyond EVE's 64 KiB fit (tested with 16 MiB).
pub const MAX_FRAME: usize = 256 << 20;

/// The only frame a subscriber ever sends: what it wants to read. After it, anything a
/// subscriber writes is a protocol violation, so a subscriber cannot write into a topic.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Hello {
    Subscribe { protocol: u32, topic: String },
}

/// What a publisher sends. The value bytes are borrowed: encoded without a copy from the
/// publisher's table, decoded straight out of the subscriber's read buffer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ServerFrame<'a> {
    /// The publisher accepts; `epoch` changes each time the publisher process starts.
    Welcome {
        protocol: u32,
        topic: String,
        publisher: String,
        epoch: u64,
    },
    /// The publisher refuses this peer (access control, wrong topic, wrong protocol).
    Refused {
        reason: String,
    },
    /// The latest value of `key`. `skipped` counts newer-than-delivered values this subscriber
    /// never saw because it was slow (coalescing); `repeat` asks for delivery even if equal.
    Update {
        key: String,
        #[serde(borrow, with = "serde_bytes")]
        value: &'a [u8],
        skipped: u64,
        repeat: bool,
    },
    Delete {
        key: String,
        skipped: u64,
    },
    /// The whole table has been sent; live changes follow.
    Synchronized,
    /// The publisher has re-published everything after its own restart.
    Restarted,
}

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("connection closed")]
    Closed,
    #[error("frame of {len} bytes exceeds the {max} byte limit")]
    TooLarge { len: usize, max: usize },
    #[error("connection closed in the middle of a {len} byte frame")]
    Truncated { len: usize },
    #[error("malformed frame: {0}")]
    Malformed(#[from] rmp_serde::decode::Error),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

/// Appends one frame for `body` to `buf`.
pub fn encode_into<B: Serialize>(
    buf: &mut Vec<u8>,
    body: &B,
) -> Result<(), rmp_serde::encode::Error> {
    let start = buf.len();
    buf.extend_from_slice(&[0; 4]);
    rmp_serde::encode::write_named(buf, body)?;
    let len = u32::try_from(buf.len() - start - 4)
        .map_err(|_| rmp_serde::encode::Error::Syntax("frame larger than 4 GiB".into()))?;
    buf[start..start + 4].copy_from_slice(&len.to_be_bytes());
    Ok(())
}

/// Reads one frame body (without its length prefix), refusing frames over `max` bytes.
pub async fn read_frame<R: AsyncRead + Unpin>(
    reader: &mut R,
    max: usize,
) -> Result<Vec<u8>, FrameError> {
    let mut prefix = [0u8; 4];
    match reader.read_exact(&mut prefix).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Err(FrameError::Closed),
        Err(e) => return Err(e.into()),
    }
    let len = u32::from_be_bytes(prefix) as usize;
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    let mut body = vec![0u8; len];
    match reader.read_exact(&mut body).await {
        Ok(_) => Ok(body),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            Err(FrameError::Truncated { len })
        }
        Err(e) => Err(e.into()),
    }
}

/// Encodes a value as it travels inside `Update`.
pub fn encode_value<T: Serialize>(value: &T) -> Result<Vec<u8>, rmp_serde::encode::Error> {
    rmp_serde::to_vec_named(value)
}

pub fn decode<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, rmp_serde::decode::Error> {
    rmp_serde::from_slice(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_round_trip_and_oversized_or_cut_frames_are_refused() {
        let mut buf = Vec::new();
        let value = [1u8, 2, 3];
        let frame = ServerFrame::Update {
            key: "k".into(),
            value: &value,
            skipped: 4,
            repeat: true,
        };
        encode_into(&mut buf, &frame).unwrap();
        encode_into(&mut buf, &ServerFrame::Synchronized).unwrap();
        let mut reader = &buf[..];
        let body = read_frame(&mut reader, MAX_FRAME).await.unwrap();
        assert_eq!(decode::<ServerFrame<'_>>(&body).unwrap(), frame);
        let body = read_frame(&mut reader, MAX_FRAME).await.unwrap();
        assert_eq!(
            decode::<ServerFrame<'_>>(&body).unwrap(),
            ServerFrame::Synchronized
        );
        assert!(matches!(
            read_frame(&mut reader, MAX_FRAME).await,
            Err(FrameError::Closed)
        ));

        let mut reader = &buf[..3];
        assert!(matches!(
            read_frame(&mut reader, MAX_FRAME).await,
            Err(FrameError::Closed)
        ));
        let mut reader = &buf[..buf.len() - 1];
        let _ = read_frame(&mut reader, MAX_FRAME).await.unwrap();
        assert!(matches!(
            read_frame(&mut reader, MAX_FRAME).await,
            Err(FrameError::Truncated { .. })
        ));
        let huge = [0xffu8, 0xff, 0xff, 0xff];
        assert!(matches!(
            read_frame(&mut &huge[..], MAX_FRAME).await,
            Err(FrameError::TooLarge { .. })
        ));
    }
}
