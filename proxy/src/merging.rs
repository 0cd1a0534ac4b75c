//! Glue between the router's row merger and the proxy's messages.
//! (Placeholder until the merger lands: every non-trivial merge is refused.)

use bytes::BytesMut;
use shardgate_router::MergePlan;

pub struct Merging;

impl Merging {
    /// Errors are "SQLSTATE: message".
    pub fn new(
        _plan: &MergePlan,
        _rd: &[u8],
        _params: &[Option<Vec<u8>>],
    ) -> Result<Merging, String> {
        Err("0A000: merging rows from several shards is not available yet".into())
    }
    pub fn row_description(&self, _rd: &[u8], _out: &mut BytesMut) {}
    pub fn push(&mut self, _shard: usize, _row: &[u8], _out: &mut BytesMut) -> Result<(), String> {
        Ok(())
    }
    pub fn finish_shard(&mut self, _shard: usize, _out: &mut BytesMut) -> Result<(), String> {
        Ok(())
    }
    pub fn finish(&mut self, _out: &mut BytesMut) -> Result<u64, String> {
        Ok(0)
    }
}
