# mxguard: a message copied, moved or appended INTO the Junk folder is spam.
# Run by Dovecot's IMAPSieve (imapsieve_mailbox1_* in 90-mxguard-imapsieve.conf);
# it hands the message to the mxguard-learn-spam program.
# Written by `mxguard learn dovecot-setup`.
require ["vnd.dovecot.pipe", "copy", "imapsieve"];

pipe :copy "mxguard-learn-spam";
