//! What sled wrote in a store directory, read from its file names, for tests of the server's
//! sled store (its page-table snapshots at open and at a clean stop).

use std::path::Path;

/// The stable log offset of the newest page-table snapshot sled finished in the store `dir`
/// (its files are `snap.` and that offset in hex; unfinished ones, `.generating`, do not
/// count), or `None` when it wrote none.
///
/// # Errors
///
/// When `dir` cannot be listed.
pub fn snapshot_offset(dir: &Path) -> std::io::Result<Option<u64>> {
    Ok(std::fs::read_dir(dir)?
        .filter_map(|entry| {
            let name = entry.ok()?.file_name().into_string().ok()?;
            u64::from_str_radix(name.strip_prefix("snap.")?, 16).ok()
        })
        .max())
}
