//! IPVS backend over generic netlink. Not built yet.
