//! cairn-edgeview: EVE's EdgeView on Cairn. The controller hands a signed JWT naming a
//! websocket dispatcher (`token`); the agent connects to it, one session per instance the
//! token allows (`session`), opens each command's envelope with the token's key (`envelope`),
//! answers EVE's read-only commands from the bus (`query`), and reports what it did
//! (`agent`: `EdgeviewStatus`, which the config-agent sends as `ZInfoEdgeview`). The wire format
//! is in `docs/edgeview.md`. Read-only by design: no shell, file copy, TCP tunnel or write.

pub mod agent;
pub mod envelope;
pub mod query;
pub mod session;
pub mod token;

pub const AGENT: &str = "edgeview";
/// The EdgeView version the agent announces (`X-EdgeView-Version`, EVE's `edgeViewVersion`):
/// the client compares it for tar copies and encryption, neither of which Cairn offers.
pub const EDGEVIEW_VERSION: &str = "0.8.8";
