//! cairn-domain-manager: being written.
