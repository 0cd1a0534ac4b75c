//! `shardgate shardmap ...`: the DBA's view of the shard map file (read, create, compare,
//! look up a key). Pure file work; the proxy itself is not involved.

use std::path::PathBuf;

use clap::{Subcommand, ValueEnum};
use shardgate_shardmap::{KeyType, KeyValue, ShardMap, ShardSpec};

#[derive(Subcommand)]
pub enum ShardmapCommand {
    /// Write a new map that spreads the slots over N shards.
    Init {
        #[arg(long)]
        shards: u32,
        /// Slots (a power of two).
        #[arg(long, default_value_t = 4096)]
        slots: u32,
        /// Place slots with the consistent-hash ring (many small ranges) instead of one
        /// contiguous, exactly balanced range per shard.
        #[arg(long)]
        ring: bool,
        /// Where to write the map (default: standard output).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Slot ranges and slot counts per shard.
    Show {
        file: PathBuf,
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// Which slots move where between two versions of the map.
    Diff { old: PathBuf, new: PathBuf },
    /// The slot and shard of a key.
    Slot {
        key: String,
        /// The shard key's SQL type: int2, int4, int8, text, varchar, uuid.
        #[arg(long = "type", default_value = "int8")]
        key_type: String,
        /// The map to look the shard up in (without it only the slot is printed).
        #[arg(long)]
        map: Option<PathBuf>,
        #[arg(long, default_value_t = 4096)]
        slots: u32,
    },
}

#[derive(Clone, Copy, ValueEnum)]
pub enum Format {
    Table,
    Json,
}

pub fn run(cmd: ShardmapCommand) -> Result<(), String> {
    match cmd {
        ShardmapCommand::Init {
            shards,
            slots,
            ring,
            out,
        } => {
            let specs = vec![ShardSpec::default(); shards as usize];
            let map = if ring {
                ShardMap::initial(&specs, slots)
            } else {
                ShardMap::initial_contiguous(&specs, slots)
            }
            .map_err(|e| e.to_string())?;
            let text = map.to_toml();
            match out {
                Some(path) => write_atomically(&path, &text),
                None => {
                    print!("{text}");
                    Ok(())
                }
            }
        }
        ShardmapCommand::Show { file, format } => {
            let map = load(&file)?;
            match format {
                Format::Table => print!("{}", map.show_table()),
                Format::Json => println!("{}", map.show_json()),
            }
            Ok(())
        }
        ShardmapCommand::Diff { old, new } => {
            let (old, new) = (load(&old)?, load(&new)?);
            print!("{}", ShardMap::diff_text(&old, &new));
            Ok(())
        }
        ShardmapCommand::Slot {
            key,
            key_type,
            map,
            slots,
        } => {
            let ty: KeyType = key_type.parse().map_err(|e| format!("--type: {e}"))?;
            let value = KeyValue::from_text(ty, key.as_bytes()).map_err(|e| format!("key: {e}"))?;
            match map {
                Some(path) => {
                    let map = load(&path)?;
                    let slot = map.slot_of_key(&value);
                    println!("slot {slot} shard {}", map.shard_of_slot(slot));
                }
                None => println!("slot {}", value.slot(slots)),
            }
            Ok(())
        }
    }
}

fn load(path: &PathBuf) -> Result<ShardMap, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    ShardMap::from_toml(&text).map_err(|e| format!("{}: {e}", path.display()))
}

/// Writes next to the target and renames over it, so a reader never sees half a map.
fn write_atomically(path: &PathBuf, text: &str) -> Result<(), String> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).map_err(|e| format!("{}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| format!("{}: {e}", path.display()))
}
