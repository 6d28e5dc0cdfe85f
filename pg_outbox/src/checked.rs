//! What `MessagesTable::open` checked about `outbox.messages` (where each column is, NOT NULL,
//! which indexes to maintain), kept for the backend's life until PostgreSQL says it may have
//! changed. Every change the checks read (columns, constraints, triggers, rules, indexes,
//! partitioning, persistence, the name) sends a relcache invalidation for the table; dropping
//! or renaming schema `outbox` one for the namespace. Invalidations are processed when a lock
//! is first taken in a transaction, so the shape is trusted only if it is still current after
//! the table's lock is held: the checks then cost nothing per call, and run again after any
//! change, never on a timer.

use std::cell::{Cell, RefCell};

use pgrx::pg_sys;

/// The checked facts, as `MessagesTable` uses them.
#[derive(Clone)]
pub struct Shape {
    pub relid: pg_sys::Oid,
    /// Physical attribute index of each column this version writes.
    pub positions: [usize; crate::table::COLUMN_COUNT],
    /// Per column: a NOT NULL constraint the value must satisfy.
    pub not_null: [bool; crate::table::COLUMN_COUNT],
    /// Attributes of the table, dropped ones included.
    pub natts: usize,
    /// The indexes to maintain, each checked, in `RelationGetIndexList` order.
    pub indexes: Vec<(pg_sys::Oid, pg_sys::IndexUniqueCheck::Type)>,
}

thread_local! {
    /// Bumped by every invalidation that may concern the table.
    static GENERATION: Cell<u64> = const { Cell::new(0) };
    /// The shape and the generation it was checked at.
    static SHAPE: RefCell<Option<(u64, Shape)>> = const { RefCell::new(None) };
}

/// Forgets the shape before checking the table again, so that any invalidation arriving during
/// the checks counts; returns the generation to pass to `remember`.
pub fn start_checking() -> u64 {
    SHAPE.set(None);
    GENERATION.get()
}

/// The remembered shape, if no invalidation has arrived since it was checked.
pub fn current() -> Option<Shape> {
    SHAPE.with_borrow(|shape| match shape {
        Some((checked_at, shape)) if *checked_at == GENERATION.get() => Some(shape.clone()),
        _ => None,
    })
}

/// Whether the shape `current` returned is still current: call after taking the table's lock,
/// which processes pending invalidations. The generation alone says it: only a new check
/// replaces the shape, and none runs in between.
pub fn still_current() -> bool {
    SHAPE.with_borrow(
        |shape| matches!(shape, Some((checked_at, _)) if *checked_at == GENERATION.get()),
    )
}

/// Keeps `shape`, checked from `generation` on; if an invalidation arrived during the checks it
/// is already stale and the next call checks again.
pub fn remember(generation: u64, shape: Shape) {
    SHAPE.set(Some((generation, shape)));
}

/// Registers the invalidation callbacks; once per backend, from `_PG_init`.
pub fn register() {
    // SAFETY: called once per backend at library load, before any publish; the callbacks only
    // touch this module's thread-locals (a backend is single-threaded).
    unsafe {
        pg_sys::CacheRegisterRelcacheCallback(Some(relation_changed), pg_sys::Datum::from(0));
        pg_sys::CacheRegisterSyscacheCallback(
            pg_sys::SysCacheIdentifier::NAMESPACEOID as _,
            Some(namespace_changed),
            pg_sys::Datum::from(0),
        );
    }
}

/// Invalidation callbacks run inside lock acquisition and must not raise or free what a caller
/// may be using: they only bump the generation (the old shape is replaced on the next call).
unsafe extern "C-unwind" fn relation_changed(_arg: pg_sys::Datum, relid: pg_sys::Oid) {
    let concerns_us = SHAPE.with(|shape| match shape.try_borrow() {
        Ok(shape) => shape.as_ref().is_none_or(|(_, shape)| {
            relid == pg_sys::InvalidOid
                || relid == shape.relid
                || shape.indexes.iter().any(|(index, _)| *index == relid)
        }),
        Err(_) => true,
    });
    if concerns_us {
        GENERATION.set(GENERATION.get().wrapping_add(1));
    }
}

unsafe extern "C-unwind" fn namespace_changed(
    _arg: pg_sys::Datum,
    _cache: std::ffi::c_int,
    _hash: u32,
) {
    GENERATION.set(GENERATION.get().wrapping_add(1));
}
