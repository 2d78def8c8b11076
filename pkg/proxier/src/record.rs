//! A backend that programs nothing and appends what each sync was asked to do to a file, one JSON object
//! per line. The end-to-end tests use it to check exactly which Service ports reached `Backend::sync`.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::backend::{Backend, BackendError, SyncReport};
use crate::model::{Changes, IpFamily, Snapshot};

/// Writes one line per sync to a file: `{"full":..,"v4":{"changed":[..],"services":N,"endpoints":{..}},"v6":..}`.
pub struct RecordingBackend {
    path: PathBuf,
    file: File,
    families: Vec<IpFamily>,
}

impl RecordingBackend {
    /// Records into `path` (created or appended).
    pub fn new(path: &Path) -> Result<Self, BackendError> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| BackendError::with_source("record", format!("open {}", path.display()), e))?;
        Ok(RecordingBackend { path: path.to_path_buf(), file, families: IpFamily::ALL.to_vec() })
    }
}

fn family_json(snapshot: &Snapshot, changes: &Changes, f: IpFamily) -> serde_json::Value {
    let fam = snapshot.family(f);
    let changed: Vec<String> = changes.family(f).services.iter().map(|s| format!("{s}/{}", s.protocol)).collect();
    // Selected cluster endpoints of each changed port, so tests can check selection end to end.
    let endpoints: serde_json::Map<String, serde_json::Value> = changes
        .family(f)
        .services
        .iter()
        .filter_map(|spn| {
            let st = fam.services.get(spn)?;
            let eps: Vec<String> = st.selected.all_reachable.iter().map(|e| e.addr_string()).collect();
            Some((format!("{spn}/{}", spn.protocol), serde_json::json!(eps)))
        })
        .collect();
    serde_json::json!({
        "changed": changed,
        "services": fam.services.len(),
        "endpoints": endpoints,
        "health_checks": fam.health_checks.iter().map(|(k, v)| (k.to_string(), serde_json::json!([v.port, v.local_endpoints]))).collect::<serde_json::Map<_, _>>(),
    })
}

impl Backend for RecordingBackend {
    fn name(&self) -> &'static str {
        "record"
    }

    fn families(&self) -> &[IpFamily] {
        &self.families
    }

    fn sync(&mut self, snapshot: &Snapshot, changes: &Changes) -> Result<SyncReport, BackendError> {
        let line = serde_json::json!({
            "full": changes.full,
            "v4": family_json(snapshot, changes, IpFamily::V4),
            "v6": family_json(snapshot, changes, IpFamily::V6),
        });
        writeln!(self.file, "{line}")
            .map_err(|e| BackendError::with_source("record", format!("write {}", self.path.display()), e))?;
        Ok(SyncReport {
            full: changes.full,
            service_ports_programmed: changes.v4.services.len() + changes.v6.services.len(),
            details: vec![],
        })
    }

    fn cleanup(&mut self) -> Result<(), BackendError> {
        Ok(())
    }
}
