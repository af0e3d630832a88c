//! Test plugin `membomb`: `validate-write` allocates 1 GiB in 1 MiB chunks, writing to every
//! page, and then accepts. With a 32 MiB instance memory cap it must trap (allocation
//! failure aborts) instead of accepting.

use flagstone_sdk::{Hook, Plugin, PluginInfo, Write};

const CHUNK: usize = 1 << 20;
const TOTAL: usize = 1 << 30;
const PAGE: usize = 4096;

struct MemBomb;

impl Plugin for MemBomb {
    fn info() -> PluginInfo {
        PluginInfo::new("membomb", env!("CARGO_PKG_VERSION"))
            .prefixes(["bomb/"])
            .hooks([Hook::ValidateWrite])
    }

    fn validate_write(_write: Write) -> Result<(), String> {
        let mut hoard: Vec<Vec<u8>> = Vec::with_capacity(TOTAL / CHUNK);
        for i in 0..TOTAL / CHUNK {
            let mut chunk = vec![0u8; CHUNK];
            for page in chunk.iter_mut().step_by(PAGE) {
                *page = i as u8 | 1;
            }
            hoard.push(std::hint::black_box(chunk));
        }
        let touched: usize = std::hint::black_box(&hoard).iter().map(Vec::len).sum();
        flagstone_sdk::debug!("membomb survived holding {touched} bytes");
        Ok(())
    }
}

flagstone_sdk::export_plugin!(MemBomb);
