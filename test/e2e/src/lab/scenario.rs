//! One lab per test for the scenario suites: built for a proxy mode (or skipped with the reason printed when
//! the machine or the binary cannot run that mode), torn down on drop and checked for leftovers.

use super::{Lab, LabConfig, skip_reason};

/// A running lab plus what must be gone after it; tears down (and checks) on drop, also on panic.
pub struct Scenario {
    lab: Option<Lab>,
    test: String,
}

impl Scenario {
    /// Builds the lab for `cfg.mode`, or reports why test `<mode>_<scenario>` cannot run here and returns
    /// `None`: no root/cgroup2/bpffs, a mode the binary reports as "not built yet", or IPVS mode on a kernel
    /// without the `ip_vs` module (the proxy's own start-up verdict; any other failure panics).
    pub fn up(scenario: &str, cfg: LabConfig) -> Option<Scenario> {
        let mode = cfg.mode.clone();
        let test = format!("{mode}_{scenario}");
        if let Some(reason) = skip_reason() {
            crate::skip!("{test}: {reason}");
            return None;
        }
        match Lab::new(cfg) {
            Ok(lab) => Some(Scenario { lab: Some(lab), test }),
            Err(e) => {
                let text = format!("{e:#}");
                if let Some(line) = text.lines().find(|l| l.contains("not built yet") || l.contains("module ip_vs")) {
                    crate::skip!("{test}: {mode} backend not available: {}", line.trim());
                    return None;
                }
                panic!("{test}: lab did not come up: {text}");
            }
        }
    }

    /// The lab.
    pub fn lab(&mut self) -> &mut Lab {
        self.lab.as_mut().expect("lab runs until drop")
    }
}

impl Drop for Scenario {
    fn drop(&mut self) {
        let Some(lab) = self.lab.take() else { return };
        let footprint = lab.footprint();
        if std::thread::panicking() {
            lab.dump_conntrack();
        }
        let torn = lab.shutdown();
        if std::thread::panicking() {
            return;
        }
        torn.unwrap_or_else(|e| panic!("{}: teardown: {e:#}", self.test));
        let left = footprint.leftovers();
        assert!(left.is_empty(), "{}: teardown left {left:?}", self.test);
    }
}
