//! Talos API adapter (gRPC over mTLS): to be written.
