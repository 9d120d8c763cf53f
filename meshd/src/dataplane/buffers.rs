//! Packet buffers straight from `mmap`: a page costs memory only once a packet is written
//! into it, and [`Pages::discard`] hands the written pages back to the kernel when the
//! tunnel goes idle.
//!
//! Why not `Vec`: `vec![0u8; n]` in a worker thread is `calloc` from that thread's malloc
//! arena, which clears (touches) every byte; `Vec::with_capacity` chunks below the mmap
//! threshold put a malloc header on a page of their own each. Either way an idle daemon kept
//! megabytes of buffers resident that it had never used for a packet.

use std::io;
use std::ptr::NonNull;

/// Rounds `n` up to a whole number of 4 KiB pages.
pub const fn page_round(n: usize) -> usize {
    (n + 4095) & !4095
}

/// A private anonymous mapping, zero-filled, unmapped on drop.
pub struct Pages {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: `Pages` owns its mapping exclusively, like a `Box<[u8]>`.
unsafe impl Send for Pages {}

impl Pages {
    /// Maps `len` bytes (rounded up to pages). Nothing is resident until written.
    pub fn new(len: usize) -> io::Result<Pages> {
        let len = page_round(len.max(1));
        // SAFETY: a fresh private anonymous mapping; no existing memory is affected.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(p.cast::<u8>()).ok_or_else(|| io::Error::other("mmap gave null"))?;
        Ok(Pages { ptr, len })
    }

    /// Cuts the mapping into consecutive chunks of the given sizes (their sum must fit).
    ///
    /// The chunks are views into `self`: the owner keeps `self` alive as long as them (both
    /// live in one struct that hands out chunks only through `&mut self`).
    pub fn carve(&mut self, sizes: impl IntoIterator<Item = usize>) -> Vec<Chunk> {
        let mut at = 0usize;
        let mut out = Vec::new();
        for size in sizes {
            assert!(at + size <= self.len, "carving past the mapping");
            // SAFETY: `at + size <= len`, so the pointer stays inside the mapping.
            let ptr = unsafe { NonNull::new_unchecked(self.ptr.as_ptr().add(at)) };
            out.push(Chunk { ptr, len: size });
            at += size;
        }
        out
    }

    /// Returns the pages to the kernel (`MADV_DONTNEED`): resident size drops, the mapping
    /// stays and reads back as zeros. Takes `&mut self`: no chunk may be borrowed meanwhile.
    pub fn discard(&mut self) {
        // SAFETY: the range is exactly our own private anonymous mapping.
        unsafe {
            libc::madvise(self.ptr.as_ptr().cast(), self.len, libc::MADV_DONTNEED);
        }
    }
}

impl Drop for Pages {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `new`, once.
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.len);
        }
    }
}

/// A fixed slice of a [`Pages`] mapping (see [`Pages::carve`] for the lifetime rule).
pub struct Chunk {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: a chunk is an exclusive view of its range (chunks never overlap), like `&mut [u8]`.
unsafe impl Send for Chunk {}

impl Chunk {
    /// The chunk's length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the chunk has no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl AsRef<[u8]> for Chunk {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: the range lies in a live mapping (owner invariant) and belongs to this chunk.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl AsMut<[u8]> for Chunk {
    fn as_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above; `&mut self` makes the borrow exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

/// A TUN write buffer: a chunk used as a vector with fixed capacity (what tun-rs's GRO
/// coalescing needs; it checks the capacity before it grows a buffer).
pub struct Slot {
    mem: Chunk,
    len: usize,
}

impl Slot {
    /// An empty slot over `mem`.
    pub fn new(mem: Chunk) -> Slot {
        Slot { mem, len: 0 }
    }

    /// The whole capacity, for writing a packet in place.
    pub fn space(&mut self) -> &mut [u8] {
        self.mem.as_mut()
    }

    /// Sets the length (clamped to the capacity).
    pub fn set_len(&mut self, len: usize) {
        self.len = len.min(self.mem.len());
    }
}

impl AsRef<[u8]> for Slot {
    fn as_ref(&self) -> &[u8] {
        &self.mem.as_ref()[..self.len]
    }
}

impl AsMut<[u8]> for Slot {
    fn as_mut(&mut self) -> &mut [u8] {
        let len = self.len;
        &mut self.mem.as_mut()[..len]
    }
}

impl tun_rs::ExpandBuffer for Slot {
    fn buf_capacity(&self) -> usize {
        self.mem.len()
    }

    fn buf_resize(&mut self, new_len: usize, value: u8) {
        let new_len = new_len.min(self.mem.len());
        if new_len > self.len {
            let old = self.len;
            self.mem.as_mut()[old..new_len].fill(value);
        }
        self.len = new_len;
    }

    fn buf_extend_from_slice(&mut self, src: &[u8]) {
        // tun-rs checks the capacity first; never write past it regardless.
        let n = src.len().min(self.mem.len() - self.len);
        let old = self.len;
        self.mem.as_mut()[old..old + n].copy_from_slice(&src[..n]);
        self.len += n;
    }
}
