//! Raw syscalls for the memfd descriptor kinds (see fdkinds/).
