//! The JSON-lines file sink: one output per line (`Output::to_json` plus the delivering
//! epoch), appended and (by default) fsynced before the delivery counts. Every node writes its
//! own file (`{node}` in the path), so lines of one shard move between files when leadership
//! moves; a reader merges the files and dedupes on (shard, seq).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::Deserialize;

use crate::{Batch, DeliveryError, Sink};

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileParams {
    /// File path; `{node}` becomes the node name, relative paths resolve against the node's
    /// data directory.
    pub path: String,
    /// fsync after each delivery (default true); without it a machine crash can lose lines
    /// that were already acknowledged.
    #[serde(default = "yes")]
    pub fsync: bool,
}

fn yes() -> bool {
    true
}

/// Appends outputs to a file.
#[derive(Debug)]
pub struct FileSink {
    path: PathBuf,
    fsync: bool,
    file: Arc<Mutex<std::fs::File>>,
}

impl FileSink {
    pub fn open(params: &FileParams, node: &str, data_dir: &Path) -> anyhow::Result<Self> {
        let path = PathBuf::from(params.path.replace("{node}", node));
        let path = if path.is_relative() { data_dir.join(path) } else { path };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| anyhow::anyhow!("opening {}: {e}", path.display()))?;
        Ok(Self { path, fsync: params.fsync, file: Arc::new(Mutex::new(file)) })
    }

    /// Where this node's lines go.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[async_trait::async_trait]
impl Sink for FileSink {
    async fn deliver(&self, batch: Batch<'_>) -> Result<(), DeliveryError> {
        let mut buf = Vec::with_capacity(batch.outputs.len() * 256);
        for o in batch.outputs {
            let mut line = o.to_json();
            line["delivered_epoch"] = serde_json::json!({ "term": batch.epoch.term, "node": batch.epoch.node });
            serde_json::to_writer(&mut buf, &line).map_err(|e| DeliveryError::Rejected { reason: e.to_string() })?;
            buf.push(b'\n');
        }
        let (file, fsync, path) = (Arc::clone(&self.file), self.fsync, self.path.clone());
        tokio::task::spawn_blocking(move || {
            let mut f = file.lock().unwrap_or_else(|p| p.into_inner());
            let before = f.metadata()?.len();
            let written = f.write_all(&buf).and_then(|()| if fsync { f.sync_data() } else { Ok(()) });
            if written.is_err() {
                // No torn line stays behind for the retry to append after.
                let _ = f.set_len(before);
            }
            written
        })
        .await
        .map_err(|e| DeliveryError::transient(e.to_string()))?
        .map_err(|e| DeliveryError::transient(format!("writing {}: {e}", path.display())))
    }
}
