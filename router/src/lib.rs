//! Pure SQL classification: no I/O, no async.
//!
//! `session` tells what a statement does to session state, which the proxy needs to keep
//! settings from leaking between clients in transaction pooling and to pin clients that use
//! session-bound features.

pub mod scan;
pub mod session;

pub use session::{classify, Pins, SessionEffects, SettingChange};
