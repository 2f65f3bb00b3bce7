//! A node whose wall clock the test can step while it runs: the binary started under
//! libfaketime (Debian's `faketime` package, which `scripts/test` installs), reading its offset
//! from a file on every clock read. The monotonic clock is left alone, as a real clock step
//! leaves it.

use std::path::PathBuf;

use crate::harness::BIN;
use order_process_testkit::Node;

/// Where Debian puts the library, for any architecture.
fn library() -> Option<PathBuf> {
    std::fs::read_dir("/usr/lib")
        .ok()?
        .filter_map(Result::ok)
        .map(|entry| entry.path().join("faketime/libfaketime.so.1"))
        .find(|path| path.is_file())
}

/// The offset file and the wrapper that starts the binary under libfaketime.
pub struct FakeClock {
    dir: tempfile::TempDir,
}

impl FakeClock {
    /// `None` (with a notice) when libfaketime is not installed.
    pub fn new() -> Option<FakeClock> {
        let Some(library) = library() else {
            eprintln!("libfaketime not installed (Debian package faketime): clock test skipped");
            return None;
        };
        let dir = tempfile::Builder::new()
            .prefix("order-process-faketime-")
            .tempdir()
            .expect("create a temp dir");
        let clock = FakeClock { dir };
        clock.set("+0");
        let script = format!(
            "#!/bin/sh\nexport LD_PRELOAD='{}'\nexport FAKETIME_TIMESTAMP_FILE='{}'\n\
             export FAKETIME_NO_CACHE=1\nexport FAKETIME_DONT_FAKE_MONOTONIC=1\nexec '{BIN}' \"$@\"\n",
            library.display(),
            clock.offset_file().display(),
        );
        std::fs::write(clock.wrapper(), script).expect("write the wrapper");
        let status = std::process::Command::new("chmod")
            .arg("+x")
            .arg(clock.wrapper())
            .status()
            .expect("run chmod");
        assert!(status.success(), "chmod the wrapper");
        Some(clock)
    }

    /// Sets the node's clock `offset` from the real one, in libfaketime's words ("-1h", "+0").
    pub fn set(&self, offset: &str) {
        std::fs::write(self.offset_file(), format!("{offset}\n")).expect("write the offset");
    }

    /// Starts a node with `config` under this clock.
    pub async fn start(&self, config: &str) -> Node {
        Node::start(&self.wrapper(), config).await
    }

    fn offset_file(&self) -> PathBuf {
        self.dir.path().join("offset")
    }

    fn wrapper(&self) -> PathBuf {
        self.dir.path().join("order-process")
    }
}
