//! Raw syscalls for the event descriptor kinds (see fdkinds/).
