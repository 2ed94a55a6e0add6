//! cairn-volume-manager: being written.
