//! TODO crate overview
