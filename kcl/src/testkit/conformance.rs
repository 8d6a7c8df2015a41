//! The lease-store conformance suite (filled in below).
