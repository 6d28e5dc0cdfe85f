//! The one place that reads a C function's arguments from its raw `fcinfo`: every other module
//! works with [`Args`], so the `unsafe` reads sit behind one constructor a reviewer can check.

use pgrx::fcinfo::{pg_arg_is_null, pg_getarg, pg_getarg_datum_raw};
use pgrx::pg_sys;

use crate::error;
use crate::varlena::Varlena;

/// The arguments of one call of a `LANGUAGE c` function.
#[derive(Clone, Copy)]
pub struct Args {
    fcinfo: pg_sys::FunctionCallInfo,
    /// The SQL name of the function, for error messages.
    pub function: &'static str,
}

impl Args {
    /// # Safety
    /// `fcinfo` must be the `FunctionCallInfo` PostgreSQL passed to the running function, and
    /// the argument types the callers ask for must match the function's SQL declaration.
    pub unsafe fn new(fcinfo: pg_sys::FunctionCallInfo, function: &'static str) -> Args {
        Args { fcinfo, function }
    }

    fn nargs(&self) -> usize {
        // SAFETY: `fcinfo` is valid for the whole call (constructor contract).
        unsafe { (*self.fcinfo).nargs as usize }
    }

    pub fn is_null(&self, index: usize) -> bool {
        assert!(
            index < self.nargs(),
            "argument {index} of {}",
            self.function
        );
        // SAFETY: `index` is within `nargs`, and `fcinfo` is valid (constructor contract).
        unsafe { pg_arg_is_null(self.fcinfo, index) }
    }

    /// The argument's datum, or `None` for NULL.
    pub fn datum(&self, index: usize) -> Option<pg_sys::Datum> {
        // SAFETY: as in `is_null`, which checked `index`.
        (!self.is_null(index)).then(|| unsafe { pg_getarg_datum_raw(self.fcinfo, index) })
    }

    /// A non-NULL argument; NULL raises a clear error naming it.
    pub fn required(&self, index: usize, name: &str, hint: &str) -> pg_sys::Datum {
        self.datum(index)
            .unwrap_or_else(|| error::null_argument(self.function, name, hint))
    }

    /// A `text` or `bytea` argument, detoasted once.
    pub fn varlena<'a>(&self, index: usize) -> Option<Varlena<'a>> {
        // SAFETY: the caller's SQL declaration makes this argument a varlena (constructor contract).
        self.datum(index)
            .map(|datum| unsafe { Varlena::from_datum(datum) })
    }

    /// A `uuid` argument.
    pub fn uuid(&self, index: usize) -> Option<uuid::Uuid> {
        assert!(
            index < self.nargs(),
            "argument {index} of {}",
            self.function
        );
        // SAFETY: the argument is declared `uuid`, and `index` is within `nargs`.
        unsafe { pg_getarg::<pgrx::Uuid>(self.fcinfo, index) }
            .map(|id| uuid::Uuid::from_bytes(*id.as_bytes()))
    }
}
