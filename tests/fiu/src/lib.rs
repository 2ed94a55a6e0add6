//! libfiu's POSIX fault injection for the agents' own file calls (Debian `fiu-utils`): an agent
//! is started through `fiu-run -x -f CTRL` (the preload, remote control on), and `fiu-ctrl`
//! arms one fault in it, by point name (`posix/io/sync/fsync`, `posix/io/dir/rename`, ...) and
//! errno. The product knows nothing of it. Shared by the agents' `io_faults` tests.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;

pub const EIO: i32 = 5;
pub const ENOSPC: i32 = 28;

/// `binary` as a command, or, with a `launcher` (`["fiu-run", "-x", ...]`), the launcher given
/// the binary as its program (it runs it in the same process, so the pid is the agent's).
pub fn command_via(launcher: &[impl AsRef<OsStr>], binary: impl AsRef<OsStr>) -> Command {
    match launcher.split_first() {
        Some((program, args)) => {
            let mut command = Command::new(program);
            command.args(args).arg(binary);
            command
        }
        None => Command::new(binary),
    }
}

/// The remote control of agents started through [`Fiu::launcher`]: `fiu-run` names its FIFOs
/// `<ctrl>-<pid>.{in,out}`.
#[derive(Debug, Clone)]
pub struct Fiu {
    ctrl: PathBuf,
}

impl Fiu {
    /// Control FIFOs under `dir` (the test's temporary directory).
    pub fn new(dir: &Path) -> Self {
        Self {
            ctrl: dir.join("fiu-ctrl"),
        }
    }

    /// The words to start an agent under libfiu with: put before its binary.
    pub fn launcher(&self) -> Vec<String> {
        vec![
            "fiu-run".into(),
            "-x".into(),
            "-f".into(),
            self.ctrl.display().to_string(),
        ]
    }

    /// Makes the next call at `point` of process `pid` fail once with `errno`. Panics when
    /// `fiu-ctrl` is missing or refuses (a test without its fault would prove nothing).
    pub fn fail_once(&self, pid: u32, point: &str, errno: i32) {
        let command = format!("enable name={point},failinfo={errno},onetime");
        let out = Command::new("fiu-ctrl")
            .args(["-c", &command, "-f"])
            .arg(&self.ctrl)
            .arg(pid.to_string())
            .output()
            .unwrap_or_else(|e| panic!("fiu-ctrl is required (Debian fiu-utils): {e}"));
        assert!(
            out.status.success(),
            "fiu-ctrl {command}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// What `strerror` says of `errno`, lower case, as the agents' errors quote it.
pub fn fault_words(errno: i32) -> &'static str {
    match errno {
        EIO => "input/output error",
        ENOSPC => "no space left on device",
        _ => panic!("no words known for errno {errno}"),
    }
}
