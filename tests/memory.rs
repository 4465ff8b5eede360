//! `microseg bench` measures memory as resident memory growth, and before each measurement
//! asks the allocator to return what it holds free (`alloc::release_free_memory`): otherwise a
//! measurement reuses pages an earlier one freed and counts too few bytes. This checks that
//! the call really returns freed memory. Its own test binary, so no other test allocates
//! meanwhile.

const MB: u64 = 1 << 20;

fn rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let kb = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<u64>().ok())
        .expect("VmRSS");
    kb * 1024
}

#[test]
fn freed_memory_goes_back_to_the_os() {
    let before = rss();
    // Small blocks, like customers: 1 M of 192 bytes, every page touched.
    let blocks: Vec<Box<[u8; 192]>> = (0..1_000_000u32)
        .map(|i| Box::new([i as u8; 192]))
        .collect();
    let held = rss();
    assert!(
        held > before + 150 * MB,
        "the blocks are resident: {} MB → {} MB",
        before / MB,
        held / MB
    );
    drop(blocks);
    microseg::alloc::release_free_memory();
    let after = rss();
    assert!(
        after + 100 * MB < held,
        "freed blocks returned: {} MB held, {} MB after",
        held / MB,
        after / MB
    );
}
