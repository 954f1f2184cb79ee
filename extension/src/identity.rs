//! Running code as another role: the model query runs with its sync owner's privileges.

use pgrx::prelude::*;

/// The role that called into the extension, ignoring SECURITY DEFINER frames (our own
/// plpgsql API is SECURITY DEFINER; this is the role set by login or SET ROLE).
pub fn caller() -> pg_sys::Oid {
    unsafe { pg_sys::GetOuterUserId() }
}

/// Run `f` with `role` as the current user, the way a SECURITY DEFINER function does. On
/// error the transaction (or subtransaction) abort restores the previous user.
pub fn as_role<R>(role: pg_sys::Oid, f: impl FnOnce() -> R) -> R {
    let mut saved_user = pg_sys::InvalidOid;
    let mut saved_context = 0;
    unsafe {
        pg_sys::GetUserIdAndSecContext(&mut saved_user, &mut saved_context);
        pg_sys::SetUserIdAndSecContext(
            role,
            saved_context | pg_sys::SECURITY_LOCAL_USERID_CHANGE as i32,
        );
    }
    let result = f();
    unsafe { pg_sys::SetUserIdAndSecContext(saved_user, saved_context) };
    result
}

/// The role that created the extension: owner of its catalog tables.
pub fn extension_owner(client: &pgrx::spi::SpiClient) -> pg_sys::Oid {
    client
        .select("SELECT extowner FROM pg_catalog.pg_extension WHERE extname = 'pg_reverse_etl'", Some(1), &[])
        .and_then(|t| t.first().get_one::<pg_sys::Oid>())
        .ok()
        .flatten()
        .unwrap_or(pg_sys::Oid::from(pg_sys::BOOTSTRAP_SUPERUSERID))
}
