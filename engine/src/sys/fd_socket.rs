//! Raw syscalls for the socket descriptor kinds (see fdkinds/).
