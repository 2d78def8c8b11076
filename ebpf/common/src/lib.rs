//! Map layouts shared by `ebpf/programs` and `pkg/ebpf`.
#![no_std]
