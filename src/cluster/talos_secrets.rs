//! The Talos secrets bundle: to be written.
