fn main(){ println!("{}", gate_user::EBPF_OBJECT.len()); }
