//! eBPF backend (socket-level load balancing and north-south tc programs). Not built yet.
